// The console works without this script. With it, a page whose <main>
// has data-refresh="N" reloads its content every N seconds, and a
// "select all" box ticks the boxes of its table.
(function () {
  "use strict";
  function refresh(main) {
    var every = parseInt(main.getAttribute("data-refresh"), 10) * 1000;
    if (!(every > 0)) return;
    setInterval(function () {
      if (document.hidden) return;
      fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (!html) return;
          var next = new DOMParser().parseFromString(html, "text/html").getElementById("main");
          if (next) main.innerHTML = next.innerHTML;
        })
        .catch(function () {});
    }, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    var main = document.getElementById("main");
    if (main && main.hasAttribute("data-refresh")) refresh(main);
    document.addEventListener("change", function (e) {
      var name = e.target.getAttribute && e.target.getAttribute("data-all");
      if (!name) return;
      var boxes = e.target.form.querySelectorAll('input[type=checkbox][name="' + name + '"]');
      for (var i = 0; i < boxes.length; i++) boxes[i].checked = e.target.checked;
    });
  });
})();
