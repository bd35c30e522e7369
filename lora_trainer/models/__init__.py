"""Model bundles and loaders (diffusers folder, single-file checkpoint, embedded demo)."""
