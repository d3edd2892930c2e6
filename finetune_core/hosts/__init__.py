"""The hosts a job runs in: the `Host` protocol, the WebUI (`webui`) and the standalone app (`standalone`), the job
runner that runs one job at a time for a host, and console progress."""
