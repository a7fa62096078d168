"""Drives the gateway's OpenAI surface with the official OpenAI Python SDK and
LangChain: embeddings (the SDK's default base64 and explicit floats),
structured outputs (a `json_schema` answer validated with `jsonschema`, the
SDK's `parse` with a Pydantic model, LangChain's `with_structured_output`),
tool calling (a required call, the round trip with the tool's result,
streamed call deltas, LangChain's `bind_tools`), fields MoltBot refuses by
name (n=2, logit_bias), a stream without include_usage,
and metadata echoed in the `moltbot` extension.

Usage: openai_api.py BASE_URL API_KEY
Prints one JSON object of what it saw; tests/tests/chat.rs asserts on it.
"""

import json
import math
import sys

import jsonschema
import openai
import pydantic
from langchain_openai import ChatOpenAI

base_url, api_key = sys.argv[1:3]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
out = {}

texts = [
    "How do I reset my online banking password?",
    "I forgot the password for my bank's website.",
    "What is the boiling point of water at sea level?",
]
# No encoding_format: the SDK asks for base64 and decodes it itself.
b64 = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
floats = client.embeddings.create(
    model="all-minilm-l6-v2", input=texts, encoding_format="float"
)
vecs = [d.embedding for d in b64.data]


def cos(a, b):
    return sum(x * y for x, y in zip(a, b))


out["embeddings"] = {
    "model": b64.model,
    "count": len(b64.data),
    "indices": [d.index for d in b64.data],
    "dims": [len(v) for v in vecs],
    "norms": [math.sqrt(cos(v, v)) for v in vecs],
    "similar": cos(vecs[0], vecs[1]),
    "unrelated": cos(vecs[0], vecs[2]),
    "max_float_vs_base64": max(
        abs(x - y)
        for f, v in zip(floats.data, vecs)
        for x, y in zip(f.embedding, v)
    ),
    "prompt_tokens": b64.usage.prompt_tokens,
    "total_tokens": b64.usage.total_tokens,
}
single = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0])
out["embeddings"]["single_equals_first"] = max(
    abs(x - y) for x, y in zip(single.data[0].embedding, vecs[0])
)


def refused(**kwargs):
    try:
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=4,
            **kwargs,
        )
        return {"status": 200}
    except openai.APIStatusError as e:
        return {"status": e.status_code, "message": str(e)}


out["n2"] = refused(n=2)
out["logit_bias"] = refused(logit_bias={"1": 5})

# Tool calling: a required call, the round trip, and streamed call deltas.
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
question = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
called = client.chat.completions.create(
    model="default", messages=question, tools=tools, tool_choice="required",
    max_tokens=64, temperature=0,
)
msg = called.choices[0].message
calls = msg.tool_calls or []
out["tool_required"] = {
    "finish": called.choices[0].finish_reason,
    "content": msg.content,
    "calls": [
        {"id": c.id, "type": c.type, "name": c.function.name, "arguments": json.loads(c.function.arguments)}
        for c in calls
    ],
}
answer = None
if calls:
    followup = question + [
        msg.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": calls[0].id,
            "content": json.dumps({"temperature_c": 18, "conditions": "light rain"}),
        },
    ]
    final = client.chat.completions.create(
        model="default", messages=followup, tools=tools, max_tokens=48, temperature=0,
    )
    answer = {"finish": final.choices[0].finish_reason, "content": final.choices[0].message.content}
out["tool_round_trip"] = answer

stream = client.chat.completions.create(
    model="default", messages=question, tools=tools,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=64, temperature=0, stream=True,
)
deltas, finish = [], None
for chunk in stream:
    if chunk.choices:
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            deltas.append({"index": tc.index, "id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments})
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
out["tool_stream"] = {"deltas": deltas, "finish": finish}

out["bad_schema"] = refused(
    response_format={
        "type": "json_schema",
        "json_schema": {"name": "nums", "schema": {"type": "array", "uniqueItems": True}},
    }
)

# Structured outputs: a json_schema answer, checked by a JSON-schema validator.
weather_schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "temperature_c": {"type": "number"},
        "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rainy", "snowy"]},
    },
    "required": ["city", "temperature_c", "conditions"],
    "additionalProperties": False,
}
done = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "It is 18 degrees and raining in Lisbon. Report the weather."}],
    response_format={
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": weather_schema, "strict": True},
    },
    max_tokens=64,
    temperature=0,
)
content = done.choices[0].message.content
try:
    jsonschema.validate(json.loads(content), weather_schema)
    error = None
except (ValueError, jsonschema.ValidationError) as e:
    error = str(e)
out["json_schema"] = {"content": content, "error": error, "finish": done.choices[0].finish_reason}

obj = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Name two planets and their order from the sun."}],
    response_format={"type": "json_object"},
    max_tokens=64,
    temperature=0,
)
try:
    out["json_object"] = isinstance(json.loads(obj.choices[0].message.content), dict)
except ValueError:
    out["json_object"] = obj.choices[0].message.content


class Person(pydantic.BaseModel):
    name: str
    age: int


parsed = client.chat.completions.parse(
    model="default",
    messages=[{"role": "user", "content": "Grace Hopper was 85. Who was she and how old?"}],
    response_format=Person,
    max_tokens=48,
    temperature=0,
)
p = parsed.choices[0].message.parsed
out["sdk_parse"] = p.model_dump() if p else None

llm = ChatOpenAI(
    base_url=f"{base_url}/v1",
    api_key=api_key,
    model="default",
    temperature=0,
    max_tokens=48,
    max_retries=0,
    use_responses_api=False,
)
lc = llm.with_structured_output(Person, method="json_schema").invoke(
    "Alan Turing was 41. Give his name and age."
)
out["langchain"] = lc.model_dump() if lc else None


def get_weather(city: str) -> str:
    """Current weather of a city."""
    return "18 C, light rain"


ai = llm.bind_tools([get_weather], tool_choice="required").invoke(
    "What's the weather like in Paris right now?"
)
out["langchain_tools"] = [{"name": c["name"], "args": c["args"]} for c in ai.tool_calls]
out["dimensions"] = None
try:
    client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=64)
except openai.APIStatusError as e:
    out["dimensions"] = {"status": e.status_code, "message": str(e)}

stream = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Say hello."}],
    stream=True,
    max_tokens=8,
    temperature=0,
)
usage_chunks, finish, chunks = 0, None, 0
for chunk in stream:
    chunks += 1
    if chunk.usage:
        usage_chunks += 1
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
out["stream_without_usage"] = {"chunks": chunks, "usage_chunks": usage_chunks, "finish": finish}

done = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Say hello."}],
    max_completion_tokens=8,
    temperature=0,
    seed=7,
    user="ada@example.com",
    metadata={"ticket": "T-1"},
)
out["metadata"] = (done.model_extra or {}).get("moltbot", {}).get("metadata")

lp = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "Count from 1 to 5."}],
    max_tokens=12, temperature=0, logprobs=True, top_logprobs=2,
)
entries = lp.choices[0].logprobs.content if lp.choices[0].logprobs else []
out["logprobs"] = {
    "text": lp.choices[0].message.content,
    "joined": "".join(e.token for e in entries),
    "count": len(entries),
    "max_logprob": max((e.logprob for e in entries), default=None),
    "tops": [len(e.top_logprobs) for e in entries],
    "greedy_is_top": all(e.top_logprobs[0].token == e.token for e in entries),
}
plain = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
)
out["logprobs_absent"] = plain.choices[0].logprobs is None

# The Responses API: a three-turn conversation through previous_response_id
# (the conversation is the session), a streamed turn, and store=False.
r1 = client.responses.create(
    model="default", instructions="Answer in one short sentence.",
    input="My name is Ada and I live in Lisbon.", max_output_tokens=24, temperature=0,
)
r2 = client.responses.create(
    model="default", previous_response_id=r1.id, input="In which city do I live?",
    max_output_tokens=24, temperature=0,
)
r3 = client.responses.create(
    model="default", previous_response_id=r2.id, input="What is my name?",
    max_output_tokens=24, temperature=0,
)
events, streamed, final_text = [], "", None
for event in client.responses.create(
    model="default", previous_response_id=r3.id, input="Say goodbye.",
    max_output_tokens=16, temperature=0, stream=True,
):
    events.append(event.type)
    if event.type == "response.output_text.delta":
        streamed += event.delta
    if event.type == "response.completed":
        final_text = event.response.output_text
unstored = client.responses.create(model="default", input="Say hi.", store=False, max_output_tokens=8)
try:
    client.responses.create(model="default", previous_response_id=unstored.id, input="Again.", max_output_tokens=8)
    continued = 200
except openai.APIStatusError as e:
    continued = e.status_code
out["responses"] = {
    "ids": [r1.id, r2.id, r3.id],
    "status": [r1.status, r2.status, r3.status],
    "texts": [r1.output_text, r2.output_text, r3.output_text],
    "usage": r3.usage.output_tokens if r3.usage else None,
    "events": events,
    "streamed": streamed,
    "final_text": final_text,
    "unstored_continued": continued,
}
print(json.dumps(out))
