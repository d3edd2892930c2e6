"""The job API every host calls: a request and its checks without a model (`request`, `preflight`), the run
(`service`), and N data-parallel processes (`launcher`)."""
