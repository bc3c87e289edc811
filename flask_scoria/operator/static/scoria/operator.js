// Operator pages: copy buttons, relative times, and reloading a run page when the run moves.
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  function span(seconds) {
    seconds = Math.max(seconds, 0);
    if (seconds < 1) return Math.round(seconds * 1000) + " ms";
    var units = [[86400, "d"], [3600, "h"], [60, "min"]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][0]) return Math.floor(seconds / units[i][0]) + " " + units[i][1];
    }
    return Math.floor(seconds) + " s";
  }

  function refreshTimes() {
    var now = Date.now();
    document.querySelectorAll("time[datetime] [data-relative]").forEach(function (el) {
      var at = Date.parse(el.parentElement.getAttribute("datetime"));
      if (!isNaN(at)) el.textContent = span((now - at) / 1000) + " ago";
    });
  }

  function setupCopy() {
    document.addEventListener("click", function (event) {
      var button = event.target.closest("button[data-copy]");
      if (!button || !navigator.clipboard) return;
      navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
        button.textContent = "copied";
        setTimeout(function () { button.textContent = "copy"; }, 1500);
      });
    });
  }

  function poll() {
    var body = document.body;
    var url = body.getAttribute("data-poll-url");
    if (!url) return;
    var status = body.getAttribute("data-status");
    var updatedAt = body.getAttribute("data-updated-at");
    var delay = 2000;
    function check() {
      if (document.hidden) { setTimeout(check, delay); return; }
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (state) {
          if (state && (state.status !== status || state.updated_at !== updatedAt)) {
            window.location.reload();
            return;
          }
          delay = Math.min(delay * 1.2, 15000);
          setTimeout(check, delay);
        })
        .catch(function () { setTimeout(check, 15000); });
    }
    setTimeout(check, delay);
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupCopy();
    refreshTimes();
    setInterval(refreshTimes, 30000);
    poll();
  });
})();
