// The console works without this file; it only adds "select all on this page".
document.addEventListener("DOMContentLoaded", function () {
  var all = document.getElementById("select-all");
  if (!all) return;
  all.addEventListener("change", function () {
    document.querySelectorAll('#messages input[name="ids"]').forEach(function (box) {
      box.checked = all.checked;
    });
  });
});
