"""Drives the gateway with the official OpenAI Python SDK, streaming.

Usage: openai_stream.py BASE_URL API_KEY SESSION_ID
Prints one JSON object: the number of content chunks, the text, the usage and
the `moltbot` extension of the last chunk.
"""

import json
import sys

import openai

base_url, api_key, session_id = sys.argv[1:4]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
stream = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
    stream=True,
    stream_options={"include_usage": True},
    max_tokens=32,
    temperature=0,
    extra_body={"session_id": session_id},
)
chunks, text, usage, finish, ext = 0, "", None, None, None
for chunk in stream:
    if chunk.choices:
        choice = chunk.choices[0]
        if choice.delta.content:
            chunks += 1
            text += choice.delta.content
        if choice.finish_reason:
            finish = choice.finish_reason
    if chunk.usage:
        usage = chunk.usage.model_dump()
    extra = getattr(chunk, "model_extra", None) or {}
    if "moltbot" in extra:
        ext = extra["moltbot"]
print(json.dumps({"chunks": chunks, "text": text, "usage": usage, "finish": finish, "moltbot": ext}))
