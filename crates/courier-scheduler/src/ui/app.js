// Courier's web UI: keeps the part of a page marked data-live up to date
// from the server's event stream (Server-Sent Events). The server sends
// HTML it rendered and escaped; "end" is the last update (the run ended).
// An update waits while the user is in a form of the live part (typing an
// approval comment), and a stream that stops says so.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const source = document.querySelector("[data-live]");
  const url = source && source.dataset.live;
  if (!url) return;
  const target = source.id === "runs" ? document.getElementById("rows") : source;
  let pending = null;
  const busy = () => {
    const active = document.activeElement;
    return active && target.contains(active) && active.closest("form");
  };
  const show = (html) => {
    const open = new Set([...target.querySelectorAll("details[open]")].map((d) => d.closest("tr") && d.closest("tr").id));
    target.innerHTML = html;
    for (const id of open) {
      const row = id && document.getElementById(id);
      const details = row && row.querySelector("details");
      if (details) details.open = true;
    }
    document.body.dataset.updated = String(Date.now());
  };
  const apply = (e) => {
    if (busy()) {
      pending = e.data;
    } else {
      show(e.data);
    }
  };
  target.addEventListener("focusout", () => {
    setTimeout(() => {
      if (pending !== null && !busy()) {
        show(pending);
        pending = null;
      }
    }, 0);
  });
  const events = new EventSource(url);
  events.addEventListener("update", apply);
  events.addEventListener("end", (e) => {
    apply(e);
    events.close();
  });
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) {
      const note = document.createElement("p");
      note.className = "error";
      note.setAttribute("role", "status");
      note.textContent = "Live updates stopped: reload the page.";
      source.before(note);
    }
  };
});
