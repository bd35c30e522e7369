"""Stand-in for the A1111 WebUI's ``modules`` package (v1.10.1), for tests only."""
