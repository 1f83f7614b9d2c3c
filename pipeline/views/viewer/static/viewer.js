// sift view: review buttons and the index-status poll. No framework, no build step, nothing fetched
// from elsewhere; a record's text is never inserted as HTML (textContent only).
"use strict";

function say(text, bad) {
  const el = document.getElementById("review-status");
  if (!el) return;
  el.hidden = false;
  el.textContent = text;
  el.className = bad ? "status error" : "status";
}

async function sendReview(form, decision) {
  const body = { a: form.dataset.a, decision: decision, note: (form.elements.note || {}).value || "" };
  if (form.dataset.id) body.id = form.dataset.id;
  if (form.dataset.query !== undefined) {
    body.query = form.dataset.query;
    const n = form.dataset.total;
    if (!window.confirm(`${decision} all ${n} matching records?`)) return;
  }
  if (decision === "edit") body.output = form.elements.output.value;
  const response = await fetch("/api/review", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Sift-Viewer": "1" },
    body: JSON.stringify(body),
  });
  let reply = {};
  try { reply = await response.json(); } catch (e) { reply = { error: await response.text() }; }
  if (!response.ok) { say(`not saved: ${reply.error || response.status}`, true); return; }
  say(`saved ${reply.written} decision(s) to ${reply.ledger}`, false);
  window.location.reload();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("[data-review]")) {
    button.addEventListener("click", () => sendReview(button.closest("form"), button.dataset.review));
  }
  const poll = document.querySelector("[data-poll]");
  if (poll) {
    const tick = async () => {
      const r = await fetch("/api/status?a=" + encodeURIComponent(poll.dataset.poll), { credentials: "same-origin" });
      const s = await r.json();
      if (s.state === "building") { window.setTimeout(tick, 1000); return; }
      window.location.reload();
    };
    window.setTimeout(tick, 1000);
  }
});
