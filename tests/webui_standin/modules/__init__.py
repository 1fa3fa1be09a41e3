"""Stand-in for the AUTOMATIC1111 WebUI v1.10.1 `modules` package (see ../README.md)."""
