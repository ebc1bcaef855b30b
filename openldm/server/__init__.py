"""`openldm serve`: a FastAPI job-queue server with a native `/v1` API and an A1111-compatible `/sdapi/v1`.

`config` holds every bound the CLI flags set, `jobs` the SQLite queue, `worker` the loop that runs
jobs, `app` the native routes, `a1111` the AUTOMATIC1111 face over the same queue. The endpoints
are documented in docs/server.md.
"""
