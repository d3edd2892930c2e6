"""A faithful stand-in for the AUTOMATIC1111 WebUI v1.10.1 `modules` package (names and signatures only).

Used only by tests/webui: its conftest puts tests/webui_stub first on sys.path and removes it afterwards.
"""
