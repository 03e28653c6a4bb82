"""`memflow live`: a story steered while it renders, watched in a browser, replayed exactly afterwards.

- `prompts.py`  lines typed on the terminal (or piped) and prompts sent from the page, checked and queued
- `pacing.py`   the viewer's 16 fps playback clock: how far generation may run ahead, stalls, latency
- `session.py`  the session: a prompt source for the generator, the MP4, the replay script and the sidecar
- `replay.py`   the replay script (`OUT.yaml`) that `memflow render` turns into the same video
- `server.py`   the page and its streams (`--serve`)
"""
