// Cross-language check of the mlmesh public API: a Node.js client built only from protos/.
//
// Usage:
//   node tests/crosslang/client.mjs [GATEWAY_ADDRESS] [API_KEY] [options]
//   node tests/crosslang/client.mjs --gateway 127.0.0.1:50051 --api-key mlm_... [options]
// Defaults: $MLMESH_CLIENT_GATEWAY or 127.0.0.1:50051, and $MLMESH_API_KEY.
// Options: --tabular-model NAME (tabular-classifier), --llm-model NAME (llm), --prompt TEXT,
//          --max-tokens N (16), --timeout-ms N (60000).
//
// It calls ListModels, Predict (one [1, 30] FP32 row sent as raw little-endian bytes), Generate
// (collects streamed chunks up to the final one carrying finish_reason and usage), then Predict
// with a wrong key, which must fail with UNAUTHENTICATED. It prints ONE JSON line and exits 0;
// on a gRPC error it prints {"ok": false, "stage", "code", "code_name", "details"} and exits 1.
// Install the pinned dependencies first: `npm ci` in tests/crosslang (scripts/setup.sh does it).

import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
const NUM_FEATURES = 30;
// Row 0 of scikit-learn's breast_cancer dataset (the tabular model's training data): malignant.
const SAMPLE_FEATURES = [
  17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053, 8.589, 153.4,
  0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193, 25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119,
  0.2654, 0.4601, 0.1189,
];
const SAMPLE_EXPECTED_LABEL = 0; // 0 = malignant, 1 = benign
const WRONG_KEY = "mlm_000000000000_not-a-valid-key";
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

class StageError extends Error {
  constructor(stage, error) {
    super(error.details ?? error.message);
    this.stage = stage;
    this.code = error.code;
    this.details = error.details ?? error.message;
  }
}

function parseArgs(argv) {
  const options = {
    gateway: process.env.MLMESH_CLIENT_GATEWAY || "127.0.0.1:50051",
    apiKey: process.env.MLMESH_API_KEY || "",
    tabularModel: "tabular-classifier",
    llmModel: "llm",
    prompt: "What is the capital of France?",
    maxTokens: 16,
    timeoutMs: 60000,
  };
  const flags = {
    "--gateway": "gateway",
    "--api-key": "apiKey",
    "--tabular-model": "tabularModel",
    "--llm-model": "llmModel",
    "--prompt": "prompt",
    "--max-tokens": "maxTokens",
    "--timeout-ms": "timeoutMs",
  };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const [flag, inline] = arg.startsWith("--") && arg.includes("=") ? arg.split(/=(.*)/s, 2) : [arg, undefined];
    if (flag in flags) {
      const value = inline ?? argv[++i];
      if (value === undefined) throw new Error(`${flag} needs a value`);
      options[flags[flag]] = value;
    } else if (arg.startsWith("--")) {
      throw new Error(`unknown option ${arg}`);
    } else {
      positional.push(arg);
    }
  }
  if (positional.length > 2) throw new Error("expected at most two positional arguments: GATEWAY_ADDRESS API_KEY");
  if (positional[0]) options.gateway = positional[0];
  if (positional[1]) options.apiKey = positional[1];
  options.maxTokens = Number(options.maxTokens);
  options.timeoutMs = Number(options.timeoutMs);
  if (!options.apiKey) throw new Error("no API key: pass it as the second argument, --api-key or $MLMESH_API_KEY");
  return options;
}

function loadGatewayService() {
  const definition = protoLoader.loadSync("mlmesh/v1/gateway.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto (prediction_id, raw_data, ...)
    longs: String, // int64 without precision loss; converted where small numbers are expected
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).mlmesh.v1.Gateway;
}

function authMetadata(apiKey) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${apiKey}`);
  return metadata;
}

function deadline(timeoutMs) {
  return new Date(Date.now() + timeoutMs);
}

// KServe v2 convention: row-major, little-endian, whatever this machine's byte order is.
function encodeFp32(values) {
  const buffer = Buffer.alloc(values.length * 4);
  values.forEach((value, i) => buffer.writeFloatLE(value, i * 4));
  return buffer;
}

const DECODERS = {
  FP32: [4, (buf, off) => buf.readFloatLE(off)],
  FP64: [8, (buf, off) => buf.readDoubleLE(off)],
  INT32: [4, (buf, off) => buf.readInt32LE(off)],
  INT64: [8, (buf, off) => Number(buf.readBigInt64LE(off))],
  UINT8: [1, (buf, off) => buf.readUInt8(off)],
  BOOL: [1, (buf, off) => buf.readUInt8(off) !== 0],
};

function decodeTensor(tensor) {
  const shape = tensor.shape.map(Number);
  const decoder = DECODERS[tensor.dtype];
  if (!decoder) return { name: tensor.name, dtype: tensor.dtype, shape, values: null };
  const [size, read] = decoder;
  const raw = Buffer.from(tensor.raw_data);
  const count = shape.reduce((a, b) => a * b, 1);
  if (raw.length !== count * size) {
    throw new Error(`output ${tensor.name}: ${raw.length} bytes for shape [${shape}] of ${tensor.dtype}`);
  }
  const values = Array.from({ length: count }, (_, i) => read(raw, i * size));
  return { name: tensor.name, dtype: tensor.dtype, shape, values };
}

function unary(client, method, request, metadata, timeoutMs, stage) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline(timeoutMs) }, (error, response) => {
      if (error) reject(new StageError(stage, error));
      else resolve(response);
    });
  });
}

function servedBy(message) {
  const served = message.served_by ?? {};
  return {
    model: served.model ?? "",
    model_version: served.model_version ?? "",
    experiment: served.experiment ?? "",
    variant: served.variant ?? "",
  };
}

async function listModels(client, options) {
  const response = await unary(client, "ListModels", {}, authMetadata(options.apiKey), options.timeoutMs, "list_models");
  return response.models.map((m) => ({ name: m.name, version: m.version, kind: m.kind, ready: m.ready }));
}

async function predict(client, options) {
  const features = SAMPLE_FEATURES;
  if (features.length !== NUM_FEATURES) throw new Error("sample row must have 30 features");
  const request = {
    model: options.tabularModel,
    inputs: [{ name: "features", dtype: "FP32", shape: [1, NUM_FEATURES], raw_data: encodeFp32(features) }],
    request_id: `crosslang-node-${process.pid}-${Date.now()}`,
  };
  const started = performance.now();
  const response = await unary(client, "Predict", request, authMetadata(options.apiKey), options.timeoutMs, "predict");
  const latencyMs = performance.now() - started;
  const outputs = response.outputs.map(decodeTensor);
  const byName = Object.fromEntries(outputs.map((t) => [t.name, t]));
  return {
    prediction_id: response.prediction_id,
    ...servedBy(response),
    outputs: outputs.map(({ name, dtype, shape }) => ({ name, dtype, shape })),
    label: byName.label?.values?.[0] ?? null,
    probabilities: byName.probabilities?.values ?? null,
    expected_label: SAMPLE_EXPECTED_LABEL,
    latency_ms: latencyMs,
  };
}

function generate(client, options) {
  const request = {
    model: options.llmModel,
    prompt: options.prompt,
    params: { max_tokens: options.maxTokens, temperature: 0, top_p: 0, seed: 0 },
    request_id: `crosslang-node-gen-${process.pid}-${Date.now()}`,
  };
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const call = client.Generate(request, authMetadata(options.apiKey), { deadline: deadline(options.timeoutMs) });
    const chunks = [];
    let first = null;
    let final = null;
    let clientTtftMs = null;
    let settled = false;
    const fail = (error) => {
      if (!settled) {
        settled = true;
        reject(error);
      }
    };
    call.on("data", (message) => {
      if (clientTtftMs === null) clientTtftMs = performance.now() - started;
      if (first === null) first = message;
      chunks.push(message);
      if (message.finish_reason) final = message;
    });
    call.on("error", (error) => fail(new StageError("generate", error)));
    call.on("end", () => {
      if (settled) return;
      if (final === null) {
        fail(new StageError("generate", { code: -1, details: "stream ended without a final message" }));
        return;
      }
      settled = true;
      const usage = final.usage ?? {};
      resolve({
        prediction_id: first.prediction_id,
        ...servedBy(first),
        chunks: chunks.length,
        indexes_in_order: chunks.every((chunk, i) => chunk.index === i),
        same_prediction_id: chunks.every((chunk) => chunk.prediction_id === first.prediction_id),
        text: chunks.map((chunk) => chunk.text).join(""),
        finish_reason: final.finish_reason,
        final_is_last: chunks[chunks.length - 1] === final,
        usage: {
          input_tokens: usage.input_tokens ?? 0,
          output_tokens: usage.output_tokens ?? 0,
          time_to_first_token_ms: usage.time_to_first_token_ms ?? 0,
          total_time_ms: usage.total_time_ms ?? 0,
        },
        client_time_to_first_chunk_ms: clientTtftMs,
        client_total_ms: performance.now() - started,
      });
    });
  });
}

async function wrongKey(client, options) {
  try {
    await unary(client, "Predict", { model: options.tabularModel }, authMetadata(WRONG_KEY), options.timeoutMs, "wrong_key");
    return { code: grpc.status.OK, code_name: "OK", details: "" };
  } catch (error) {
    if (!(error instanceof StageError)) throw error;
    return { code: error.code, code_name: CODE_NAMES[error.code] ?? String(error.code), details: error.details };
  }
}

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (error) {
    console.log(JSON.stringify({ ok: false, stage: "args", code: null, code_name: null, details: error.message }));
    return 2;
  }
  const Gateway = loadGatewayService();
  const client = new Gateway(options.gateway, grpc.credentials.createInsecure());
  try {
    const result = { ok: true, gateway: options.gateway, client: `node ${process.version} @grpc/grpc-js` };
    result.models = await listModels(client, options);
    result.predict = await predict(client, options);
    result.generate = await generate(client, options);
    result.wrong_key = await wrongKey(client, options);
    let exitCode = 0;
    if (result.wrong_key.code !== grpc.status.UNAUTHENTICATED) {
      result.ok = false;
      result.error = `a wrong API key got ${result.wrong_key.code_name}, expected UNAUTHENTICATED`;
      exitCode = 1;
    }
    console.log(JSON.stringify(result));
    return exitCode;
  } catch (error) {
    if (error instanceof StageError) {
      const codeName = CODE_NAMES[error.code] ?? String(error.code);
      console.log(JSON.stringify({ ok: false, stage: error.stage, code: error.code, code_name: codeName, details: error.details }));
    } else {
      console.log(JSON.stringify({ ok: false, stage: "client", code: null, code_name: null, details: String(error?.stack ?? error) }));
    }
    return 1;
  } finally {
    client.close();
  }
}

process.exitCode = await main();
