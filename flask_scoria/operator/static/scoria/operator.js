// Operator pages: times in the viewer's time zone, copy buttons, reloading a run page
// when the run moves, the count of approvals waiting kept current, and the runs list's
// filters folded away on a phone.
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

  function relative(seconds) {
    // Less than a second ahead counts as now, as on the server.
    return seconds <= -1 ? "in " + span(-seconds) : span(seconds) + " ago";
  }

  function pad(number) {
    return (number < 10 ? "0" : "") + number;
  }

  // "2024-06-01 17:30:03 +05:30": the moment on the viewer's clock, with its offset.
  function localTime(date) {
    var minutes = -date.getTimezoneOffset();
    var zone = "UTC";
    if (minutes !== 0) {
      var size = Math.abs(minutes);
      zone = (minutes > 0 ? "+" : "-") + pad(Math.floor(size / 60)) + ":" + pad(size % 60);
    }
    return date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) +
      " " + pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds()) +
      " " + zone;
  }

  // The server writes UTC; the title keeps it, the visible text follows the viewer's zone.
  function showLocalTimes() {
    document.querySelectorAll("time[datetime] [data-local]").forEach(function (el) {
      var at = new Date(el.parentElement.getAttribute("datetime"));
      if (!isNaN(at.getTime())) el.textContent = localTime(at);
    });
  }

  function refreshTimes() {
    var now = Date.now();
    document.querySelectorAll("time[datetime] [data-relative]").forEach(function (el) {
      var at = Date.parse(el.parentElement.getAttribute("datetime"));
      if (!isNaN(at)) el.textContent = relative((now - at) / 1000);
    });
  }

  function setupCopy() {
    document.addEventListener("click", function (event) {
      var button = event.target.closest("button[data-copy]");
      if (!button) return;
      var text = button.getAttribute("data-copy");
      // The label is what a screen reader reads of the button: it says the same. Its own
      // label is kept once, so that a second click meanwhile does not keep "copied".
      if (!button.hasAttribute("data-label")) {
        button.setAttribute("data-label", button.getAttribute("aria-label") || "");
      }
      var said = function (what) {
        clearTimeout(button.scoriaReset);
        button.textContent = what;
        button.setAttribute("aria-label", what);
        button.scoriaReset = setTimeout(function () {
          button.textContent = "copy";
          var label = button.getAttribute("data-label");
          if (label) button.setAttribute("aria-label", label);
          else button.removeAttribute("aria-label");
        }, 1500);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(function () { said("copied"); });
      } else {
        // Served over plain HTTP, the page may not use the clipboard's API.
        said(copyBySelecting(text) ? "copied" : "select to copy");
      }
    });
  }

  function copyBySelecting(text) {
    var field = document.createElement("textarea");
    field.value = text;
    field.setAttribute("readonly", "");
    field.style.position = "fixed";
    field.style.opacity = "0";
    document.body.appendChild(field);
    field.select();
    var done = false;
    try { done = document.execCommand("copy"); } catch (error) { done = false; }
    document.body.removeChild(field);
    return done;
  }

  // Answers after which asking again cannot help: signed out, or the run is gone.
  var FINAL = [401, 403, 404, 410];

  function stopPolling(response) {
    var live = document.querySelector("[data-live]");
    if (!live) return;
    live.textContent = response.status === 404 || response.status === 410
      ? "stopped refreshing: the run is no longer available"
      : "stopped refreshing: operator access ended; reload to sign in again";
  }

  var TYPED = "; what you typed has not been sent";

  // The panels the page shows open, told apart from those the operator opens.
  function markOpenPanels() {
    document.querySelectorAll("details[open]").forEach(function (panel) {
      panel.scoriaShownOpen = true;
    });
  }

  // What a reload would take from the operator, as the notice says it: what they typed
  // into the page's forms (a note, edited arguments) or a refused form to fix (TYPED), a
  // panel they opened or text they selected (""); null when it would take nothing.
  function unsaved() {
    if (document.querySelector("[aria-invalid=true]")) return TYPED;
    var fields = document.querySelectorAll("input[type=text], textarea");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].value !== fields[i].defaultValue) return TYPED;
    }
    var panels = document.querySelectorAll("details[open]");
    for (var j = 0; j < panels.length; j++) {
      if (!panels[j].scoriaShownOpen) return "";
    }
    var selection = window.getSelection();
    return selection && !selection.isCollapsed ? "" : null;
  }

  // Asks ``url`` for its JSON while the page is visible: first after ``delay`` ms, then
  // more slowly each time (by ``growth``, up to ``slowest``), and at ``slowest`` after a
  // failed request. ``seen(state)`` returns true to go on asking; ``ended(response)``
  // hears of an answer after which asking again cannot help.
  function watch(url, delay, growth, slowest, seen, ended) {
    function later(wait) {
      setTimeout(check, wait);
    }
    function check() {
      if (document.hidden) { later(delay); return; }
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (FINAL.indexOf(response.status) !== -1) {
            ended(response);
            return;
          }
          delay = Math.min(delay * growth, slowest);
          if (!response.ok) { later(delay); return; }
          return response.json().then(function (state) {
            if (seen(state)) later(delay);
          });
        })
        .catch(function () { later(slowest); });
    }
    later(delay);
  }

  function poll() {
    var body = document.body;
    var url = body.getAttribute("data-poll-url");
    if (!url) return;
    var status = body.getAttribute("data-status");
    var updatedAt = body.getAttribute("data-updated-at");
    watch(url, 2000, 1.2, 15000, function (state) {
      if (state.status === status && state.updated_at === updatedAt) return true;
      var lost = unsaved();
      if (lost !== null) {
        // Reloading would drop what the operator is doing: say so, and let them reload.
        var live = document.querySelector("[data-live]");
        if (live) {
          live.textContent = "this run changed since the page loaded: reload to see it" + lost;
          live.classList.add("changed");
        }
        return false;
      }
      // A page an action answered (a refused form) sits at the action's URL:
      // reloading it would send the form again.
      var page = body.getAttribute("data-run-url");
      if (page && new URL(page, window.location.href).pathname !== window.location.pathname) {
        window.location.replace(page);
      } else {
        window.location.reload();
      }
      return false;
    }, stopPolling);
  }

  // The navigation's count of approvals waiting follows new requests and decisions made
  // elsewhere; the inbox's first page says when it no longer shows what is waiting. It
  // does not reload itself: the rows would move under the operator's pointer.
  function watchApprovals() {
    var url = document.body.getAttribute("data-inbox-url");
    if (!url) return;
    var count = document.getElementById("pending-count");
    var live = document.querySelector("[data-inbox-live]");
    var shown = count ? count.textContent : null;
    watch(url, 3000, 1.5, 30000, function (state) {
      if (count && state.waiting !== null) {
        count.textContent = state.waiting;
        count.title = state.waiting + " waiting for a decision";
        count.classList.toggle("count-zero", state.waiting === "0");
      }
      var newest = state.newest || "";
      if (live && (newest !== live.getAttribute("data-inbox-newest") ||
                   (state.waiting !== null && state.waiting !== shown))) {
        live.textContent = "The approvals waiting changed since this page loaded: ";
        var reload = document.createElement("a");
        reload.href = live.getAttribute("data-inbox-page");
        reload.textContent = "reload to see them";
        live.appendChild(reload);
        live.classList.add("changed");
        live = null;
      }
      return true;
    }, function () {});
  }

  // On a phone the runs list's filters fold away while none is in use; the button
  // (shown on narrow screens only) unfolds them.
  function foldFilters() {
    var toggle = document.querySelector(".filters-toggle");
    if (!toggle) return;
    var form = document.getElementById(toggle.getAttribute("aria-controls"));
    function show(open) {
      form.classList.toggle("folded", !open);
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    }
    show(toggle.getAttribute("data-in-use") !== "0");
    toggle.addEventListener("click", function () {
      show(form.classList.contains("folded"));
    });
  }

  // A decision that cannot be taken back, offered in one click: ask first.
  function confirmForms() {
    document.addEventListener("submit", function (event) {
      var question = event.target.getAttribute("data-confirm");
      if (question && !window.confirm(question)) event.preventDefault();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    confirmForms();
    foldFilters();
    setupCopy();
    showLocalTimes();
    refreshTimes();
    setInterval(refreshTimes, 30000);
    markOpenPanels();
    poll();
    watchApprovals();
  });
})();
