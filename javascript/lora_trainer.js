// lora-trainer: front-end helpers for the Train LoRA tab (copy a <lora:name:w> tag, send it to
// txt2img). The WebUI loads this file as a page script; the standalone app runs it once on load.
// Everything is attached to window under lt-prefixed names, and it installs itself only once.
(function () {
  if (window.ltTrainerInstalled) return;
  window.ltTrainerInstalled = true;

  function root() {
    return typeof gradioApp === "function" ? gradioApp() : document;
  }

  function flash(message) {
    var box = root().querySelector("#lt-test-msg") || null;
    if (box) box.setAttribute("data-lt-flash", message);
    var note = document.createElement("div");
    note.className = "lt-toast";
    note.textContent = message;
    document.body.appendChild(note);
    setTimeout(function () { note.remove(); }, 1800);
  }

  function copyFallback(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.className = "lt-copy-buffer";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more we can do */ }
    area.remove();
  }

  window.ltCopyTag = function (tag) {
    if (!tag) { flash("choose a LoRA first"); return; }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(tag).then(
        function () { flash("copied " + tag); },
        function () { copyFallback(tag); flash("copied " + tag); });
    } else {
      copyFallback(tag);
      flash("copied " + tag);
    }
  };

  // The training log shows its newest lines: keep it scrolled to the end as it grows, unless the
  // reader scrolled up to read (gradio 3.x has no autoscroll; newer ones do not follow every update).
  function followLog(area) {
    if (!area.ltFollowing) {
      area.ltFollowing = true;
      area.ltPinned = true;
      area.addEventListener("scroll", function () {
        area.ltPinned = area.scrollHeight - area.scrollTop - area.clientHeight < 24;
      });
    }
    if (area.ltPinned && area.scrollTop + area.clientHeight < area.scrollHeight - 1) {
      area.scrollTop = area.scrollHeight;
    }
  }
  setInterval(function () {
    root().querySelectorAll(".lt-log textarea").forEach(followLog);
  }, 400);

  // gradio 3.x sizes a plot's chart to its box (width "container") when it draws it, so a plot
  // that got its data while its section was hidden stays 0 px wide. When a plot's box appears,
  // a window resize makes the chart measure its box again.
  if (typeof ResizeObserver === "function") {
    var plots = new ResizeObserver(function (entries) {
      var shown = false;
      entries.forEach(function (e) {
        if (!e.target.ltWidth && e.contentRect.width > 0) shown = true;
        e.target.ltWidth = e.contentRect.width;
      });
      if (shown) window.dispatchEvent(new Event("resize"));
    });
    setInterval(function () {
      root().querySelectorAll(".lt-plot").forEach(function (el) {
        if (!el.ltObserved) { el.ltObserved = true; plots.observe(el); }
      });
    }, 400);
  }

  window.ltSendToTxt2img = function (tag) {
    if (!tag) { flash("choose a LoRA first"); return; }
    var area = root().querySelector("#txt2img_prompt textarea");
    if (!area) { flash("txt2img is not on this page"); return; }
    if (area.value.indexOf(tag) < 0) {
      area.value = area.value ? area.value.replace(/\s+$/, "") + " " + tag : tag;
      // gradio only notices programmatic changes through an input event
      area.dispatchEvent(new Event("input", { bubbles: true }));
    }
    if (typeof switch_to_txt2img === "function") switch_to_txt2img();
    flash("sent " + tag + " to txt2img");
  };
})();
