"""The pipeline's stages, over the storage and A1111 clients; ``sidecar.worker`` wires them.

fetch     receive, check on receipt, hold under a lease (``Fetcher``)
generate  txt2img in order, with queue-ahead (``Generator``)
finish    decode, upload, job.json (``Finisher``)
settle    delete, release, defer or poison, counted; the retry policy (``Settler``)
stop      one way to stop, with a reason and the exit code that follows (``Stop``)
book      what is held and what became of it (``Book``, ``Held``)
ports     what the stages need of the clients, as protocols
"""
