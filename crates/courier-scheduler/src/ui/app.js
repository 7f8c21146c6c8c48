// Courier's web UI: keeps the part of a page marked data-live up to date
// from the server's event stream (Server-Sent Events). The server sends
// HTML it rendered and escaped; "end" is the last update (the run ended).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const source = document.querySelector("[data-live]");
  const url = source && source.dataset.live;
  if (!url) return;
  const target = source.id === "runs" ? document.getElementById("rows") : source;
  const events = new EventSource(url);
  const apply = (e) => {
    const open = new Set([...target.querySelectorAll("details[open]")].map((d) => d.closest("tr") && d.closest("tr").id));
    target.innerHTML = e.data;
    for (const id of open) {
      const row = id && document.getElementById(id);
      const details = row && row.querySelector("details");
      if (details) details.open = true;
    }
    document.body.dataset.updated = String(Date.now());
  };
  events.addEventListener("update", apply);
  events.addEventListener("end", (e) => {
    apply(e);
    events.close();
  });
});
