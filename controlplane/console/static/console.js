// meshnode console: the only script. Reloads the page every 5 s while the
// "refresh" box is ticked (remembered in this browser). No data is fetched by
// script: every page is rendered by the control plane.
"use strict";
(function () {
  var KEY = "meshnode-console-refresh";
  var box = document.getElementById("auto-refresh");
  if (!box) { return; }
  var timer = null;
  function arm() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (box.checked) { timer = setTimeout(function () { window.location.reload(); }, 5000); }
  }
  try { box.checked = window.localStorage.getItem(KEY) === "1"; } catch (e) { /* storage off */ }
  box.addEventListener("change", function () {
    try { window.localStorage.setItem(KEY, box.checked ? "1" : "0"); } catch (e) { /* storage off */ }
    arm();
  });
  arm();
})();
