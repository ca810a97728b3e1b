"""File formats as bytes, shared by the sources that read them and the sinks that write them.

Nothing here opens a checkpoint or plans a job: ``files`` reads the small files strangers send
(JSON objects within limits, names joined to a folder without leaving it); ``safetensors``
parses and builds safetensors headers.
"""
