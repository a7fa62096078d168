// Drives the gateway with the official OpenAI Node SDK (installed by
// `make node-sdk` into $(TOOLS_DIR); NODE_PATH points there): embeddings,
// one answer, one streamed answer with usage, a json_schema answer, a
// required tool call and its round trip, a Responses conversation, and n=2
// refused with 400.
//
// Usage: node openai_api.cjs BASE_URL API_KEY
// Prints one JSON object of what it saw; tests/tests/chat.rs asserts on it.
const OpenAI = require("openai");

async function main() {
  const [baseURL, apiKey] = process.argv.slice(2);
  const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey, maxRetries: 0 });
  const out = {};

  const emb = await client.embeddings.create({
    model: "all-minilm-l6-v2",
    input: ["first text", "second text"],
  });
  out.embeddings = {
    count: emb.data.length,
    dims: emb.data.map((d) => d.embedding.length),
    norms: emb.data.map((d) => Math.sqrt(d.embedding.reduce((s, x) => s + x * x, 0))),
    prompt_tokens: emb.usage.prompt_tokens,
  };

  const done = await client.chat.completions.create({
    model: "default",
    messages: [{ role: "user", content: "Say hello." }],
    max_tokens: 8,
    temperature: 0,
  });
  out.completion = {
    text: done.choices[0].message.content,
    finish: done.choices[0].finish_reason,
    completion_tokens: done.usage.completion_tokens,
  };

  const stream = await client.chat.completions.create({
    model: "default",
    messages: [{ role: "user", content: "Count from 1 to 5." }],
    max_tokens: 16,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length > 0) text += chunk.choices[0].delta.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  out.stream = { text, usage };

  const schema = {
    type: "object",
    properties: { city: { type: "string" }, country: { type: "string" } },
    required: ["city", "country"],
    additionalProperties: false,
  };
  const structured = await client.chat.completions.create({
    model: "default",
    messages: [{ role: "user", content: "Name the capital of France and its country." }],
    response_format: { type: "json_schema", json_schema: { name: "capital", schema, strict: true } },
    max_tokens: 48,
    temperature: 0,
  });
  out.json_schema = JSON.parse(structured.choices[0].message.content);

  const tools = [{
    type: "function",
    function: {
      name: "get_weather",
      description: "Current weather of a city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    },
  }];
  const question = [{ role: "user", content: "What's the weather like in Paris right now?" }];
  const called = await client.chat.completions.create({
    model: "default", messages: question, tools, tool_choice: "required", max_tokens: 64, temperature: 0,
  });
  const message = called.choices[0].message;
  out.tool_call = {
    finish: called.choices[0].finish_reason,
    name: message.tool_calls[0].function.name,
    arguments: JSON.parse(message.tool_calls[0].function.arguments),
  };
  const final = await client.chat.completions.create({
    model: "default",
    messages: [...question, message, { role: "tool", tool_call_id: message.tool_calls[0].id, content: '{"temperature_c": 18}' }],
    tools, max_tokens: 48, temperature: 0,
  });
  out.tool_answer = final.choices[0].message.content;

  const first = await client.responses.create({
    model: "default", input: "My name is Grace.", max_output_tokens: 24, temperature: 0,
  });
  const second = await client.responses.create({
    model: "default", previous_response_id: first.id, input: "What is my name?", max_output_tokens: 24, temperature: 0,
  });
  out.responses = [first.output_text, second.output_text];

  try {
    await client.chat.completions.create({
      model: "default",
      messages: [{ role: "user", content: "Say hi." }],
      n: 2,
    });
    out.n2 = { status: 200 };
  } catch (e) {
    out.n2 = { status: e.status, message: String(e.message) };
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
