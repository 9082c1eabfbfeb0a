"""The operator console: audit lookups in the browser, at `/console`, served by the app itself.

- `pages`: the routes (Overview, Jobs, Job, Problems, asset previews, Verify, Retry);
- `session`: sign-in with `RECEIVER_API_TOKEN`, the signed session cookie, CSRF checks;
- `media`: archived objects streamed with byte ranges (the video preview seeks);
- `summary`: what the Overview and Problems pages show, gathered from the ports;
- `templates/`, `static/`: server-rendered Jinja2 pages and their one stylesheet (no CDN).

It reuses the audit API's JSON shapes (`job_json`, `summary_json`, `job_filter`) and the
operations behind `receiver verify` and `receiver retry`, so the three agree.
"""

from receiver.audit.console.pages import Console, ConsoleParts

__all__ = ["Console", "ConsoleParts"]
