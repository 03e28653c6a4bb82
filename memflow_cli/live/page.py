"""The page `--serve` serves: everything inline, nothing fetched from elsewhere."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>memflow live</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #111; color: #eee; }
  main { max-width: 900px; margin: 0 auto; padding: 16px; }
  #screen { width: 100%; background: #000; image-rendering: auto; display: block; min-height: 120px; }
  #clock { color: #9ab; font-variant-numeric: tabular-nums; }
  #prompt { font-size: 18px; margin: 8px 0; }
  form { display: flex; gap: 8px; margin: 12px 0; }
  #next { flex: 1; font: inherit; padding: 6px; background: #222; color: #eee; border: 1px solid #555; }
  button { font: inherit; padding: 6px 14px; }
  #said { color: #fc6; min-height: 1.4em; }
  ol { padding-left: 20px; color: #bbb; }
  li.now { color: #fff; font-weight: bold; }
  .ended { color: #f88; }
</style>
</head>
<body>
<main>
  <img id="screen" alt="the video as it is made">
  <div id="clock">frame <span id="frame">0</span> &middot; <span id="time">0.00</span> s
    <span id="state"></span></div>
  <div id="prompt"></div>
  <form id="send">
    <input id="next" name="prompt" maxlength="2000" autocomplete="off" placeholder="what happens next">
    <button type="submit">send</button>
  </form>
  <div id="said"></div>
  <h3>timeline</h3>
  <ol id="timeline"></ol>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => token ? path + "?token=" + encodeURIComponent(token) : path;
const $ = (id) => document.getElementById(id);
$("screen").src = withToken("video");

function show(status) {
  $("frame").textContent = status.frame;
  $("time").textContent = status.time_s.toFixed(2);
  $("prompt").textContent = status.prompt;
  $("state").textContent = status.ended ? "(the session is over)" : "";
  $("state").className = status.ended ? "ended" : "";
  const list = $("timeline");
  list.replaceChildren(...status.segments.map((segment, index) => {
    const item = document.createElement("li");
    item.textContent = segment.start_s.toFixed(2) + " s (" + segment.source + "): " + segment.prompt;
    if (index === status.segment) item.className = "now";
    return item;
  }));
}

const events = new EventSource(withToken("events"));
events.onmessage = (message) => {
  const status = JSON.parse(message.data);
  show(status);
  if (status.ended) events.close();
};

$("send").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("next").value;
  try {
    const reply = await fetch(withToken("prompt"), { method: "POST", body: text,
                                                     headers: { "Content-Type": "text/plain; charset=utf-8" } });
    const body = await reply.json();
    $("said").textContent = reply.ok ? "queued: " + body.queued : body.error;
    if (reply.ok) $("next").value = "";
  } catch (error) {
    $("said").textContent = "not sent: " + error;
  }
});
</script>
</body>
</html>
"""
