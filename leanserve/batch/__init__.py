"""The OpenAI Files and Batches API's durable state: uploaded JSONL files kept on disk, and in one
SQLite file their metadata, the batches and every request line's progress, so a restarted server
resumes unfinished batches without redoing or losing a finished line (``store.py``). The HTTP
endpoints and the runner that feeds batch lines to the engine on idle capacity sit on top of it.
"""
