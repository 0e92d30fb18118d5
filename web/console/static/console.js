// Tollgate admin console: progressive enhancement only; every page works without it.
"use strict";

document.addEventListener("DOMContentLoaded", function () {
  // Ask before a change that affects every process or a live client.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) {
        event.preventDefault();
      }
    });
  });

  // The same for one button of a form (e.g. "Remove all limits" next to "Save limits").
  document.querySelectorAll("button[data-confirm-button]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.getAttribute("data-confirm-button"))) {
        event.preventDefault();
      }
    });
  });

  // Offer the browser's own time zone in the chart's zone picker.
  document.querySelectorAll("select[data-add-browser-zone]").forEach(function (select) {
    var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (zone && !Array.prototype.some.call(select.options, function (o) { return o.value === zone; })) {
      select.add(new Option(zone + " (this browser)", zone));
    }
  });

  // Chart controls apply as soon as one changes.
  document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
    select.addEventListener("change", function () {
      select.form.submit();
    });
  });
});
