"""Stage 2, archive: copy each recorded output into the store before its link dies.

- `worker`: leases tasks earliest deadline first, copies, marks, writes the manifest, acks;
- `fetch`: the only code that opens connections to provider storage (the URL guard, timeouts,
  Range resume, size limits);
- `manifest`: the per-job `manifest.json` written beside the assets (redacted payloads, checksums).
"""
