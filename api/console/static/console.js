// The console's live view (api/console/live.py): one EventSource on /console/live/events.
// Values are set with textContent only, never parsed as HTML: payloads and ids are user input.
"use strict";

(function () {
  const table = document.querySelector("#live tbody");
  if (!table) {
    return;
  }
  const state = document.getElementById("live-state");
  const dropped = document.getElementById("live-dropped");
  const filter = document.getElementById("live-filter");
  const MAX_ROWS = 200; // the page keeps the newest rows only

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  const source = new EventSource("/console/live/events");
  source.addEventListener("hello", (event) => {
    const hello = JSON.parse(event.data);
    filter.textContent = hello.filter;
    state.textContent = "connected";
    state.className = "on";
  });
  source.addEventListener("message", (event) => {
    const message = JSON.parse(event.data);
    const row = document.createElement("tr");
    row.className = "message";
    cell(row, new Date(message.at).toISOString().replace("T", " ").slice(0, 23));
    cell(row, message.device);
    cell(row, message.topic);
    cell(row, String(message.size) + (message.truncated ? " (cut)" : ""));
    const payload = cell(row, message.payload);
    payload.className = "payload " + message.encoding;
    table.insertBefore(row, table.firstChild);
    while (table.rows.length > MAX_ROWS) {
      table.deleteRow(table.rows.length - 1);
    }
    dropped.textContent = String(message.dropped) + " dropped";
    dropped.className = message.dropped > 0 ? "dropped some" : "dropped";
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself (retry: 2000); a refusal (503, 401) closes it.
    state.textContent = source.readyState === EventSource.CLOSED
      ? "closed: the live view was refused (too many viewers, or signed out); reload to retry"
      : "reconnecting…";
    state.className = "off";
  });
})();
