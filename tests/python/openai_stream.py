"""Drives the gateway with the official OpenAI Python SDK, streaming.

Usage: openai_stream.py BASE_URL API_KEY SESSION_ID [QUESTION]
An empty SESSION_ID starts a new session; QUESTION defaults to a counting
request. Prints one JSON object: the `x-moltbot-cache` response header, the
number of content chunks, the text, the finish reason, the usage and the
`moltbot` extension of the last chunk.
"""

import json
import sys

import openai

base_url, api_key, session_id = sys.argv[1:4]
question = sys.argv[4] if len(sys.argv) > 4 else "Count from 1 to 10, separated by commas."
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
raw = client.chat.completions.with_raw_response.create(
    model="default",
    messages=[{"role": "user", "content": question}],
    stream=True,
    stream_options={"include_usage": True},
    max_tokens=32,
    temperature=0,
    extra_body={"session_id": session_id} if session_id else None,
)
cache = raw.headers.get("x-moltbot-cache")
chunks, text, usage, finish, ext = 0, "", None, None, None
for chunk in raw.parse():
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
print(json.dumps({"cache": cache, "chunks": chunks, "text": text, "finish": finish, "usage": usage, "moltbot": ext}))
