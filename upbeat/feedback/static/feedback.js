// Keyboard shortcuts for the rating form, and no double submission. Our own code: no CDN.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("vote");
  if (!form) return;
  const byKey = new Map();
  for (const button of form.querySelectorAll("button[data-key]")) {
    for (const key of button.dataset.key.split(" ")) byKey.set(key, button);
  }
  let sent = false;
  const send = (button) => {
    if (sent) return;
    sent = true;
    form.requestSubmit(button);
  };
  form.addEventListener("submit", () => {
    // disable after the browser has read the clicked button's value
    setTimeout(() => form.querySelectorAll("button").forEach((b) => (b.disabled = true)), 0);
  });
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (event.target instanceof HTMLInputElement) return;
    const button = byKey.get(event.key.toLowerCase());
    if (button) {
      event.preventDefault();
      send(button);
    }
  });
  form.dataset.keys = "ready"; // the shortcuts work from here on (the browser test waits for it)
});
