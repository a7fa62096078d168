"""Asks the gateway one greedy question with the official OpenAI Python SDK,
streaming, in a new session, and reads the raw response's headers.

Usage: openai_stream_question.py BASE_URL API_KEY QUESTION
Prints one JSON object: the `x-moltbot-cache` header, the number of content
chunks, the text, the finish reason, the usage and the `moltbot` extension
of the last chunk.
"""

import json
import sys

import openai

base_url, api_key, question = sys.argv[1:4]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
raw = client.chat.completions.with_raw_response.create(
    model="default",
    messages=[{"role": "user", "content": question}],
    stream=True,
    stream_options={"include_usage": True},
    max_tokens=32,
    temperature=0,
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
