// The console works without this file; it adds "select all on this page" and refreshes the
// counts per status every 10 seconds.
document.addEventListener("DOMContentLoaded", function () {
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll('#messages input[name="ids"]').forEach(function (box) {
        box.checked = all.checked;
      });
    });
  }
  var counts = document.getElementById("counts");
  if (counts) {
    setInterval(function () {
      fetch("/counts?list=" + encodeURIComponent(counts.dataset.list), { credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (data) {
          if (!data) return;
          Object.keys(data).forEach(function (status) {
            var n = counts.querySelector('[data-status="' + status + '"] .n');
            if (n) n.textContent = data[status].n.toLocaleString("en-US") + (data[status].capped ? "+" : "");
          });
        })
        .catch(function () {});
    }, 10000);
  }
});
