// Keeps a member's run page current: polls the run's status.json and reloads the
// page when the run has moved on (approved, answered, rejected, failed).
(function () {
  "use strict";
  var status = document.getElementById("run-status");
  if (!status || !status.dataset.pollUrl) {
    return;
  }
  var seen = status.dataset.updatedAt;
  function poll() {
    fetch(status.dataset.pollUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (run) {
        if (run && run.updated_at !== seen) {
          window.location.reload();
        } else if (!run || !run.final) {
          window.setTimeout(poll, 2000);
        }
      })
      .catch(function () {
        window.setTimeout(poll, 5000);
      });
  }
  window.setTimeout(poll, 2000);
})();
