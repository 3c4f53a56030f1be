// A grpc-js client of Apiary: Health.Watch, Queen.ListModels and a streamed Queen.Infer.
// Usage: node client.js QUEEN_ADDRESS REPO_ROOT; prints one JSON line of what it saw.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [address, root] = process.argv.slice(2);
const options = { keepCase: true, enums: String, defaults: true, includeDirs: [root, __dirname] };
const apiary = grpc.loadPackageDefinition(loader.loadSync("protos/v1/queen.proto", options));
const health = grpc.loadPackageDefinition(loader.loadSync(path.join(__dirname, "health.proto"), options));
const deadline = () => new Date(Date.now() + 10000);

function firstWatchStatus() {
  return new Promise((resolve, reject) => {
    const stub = new health.grpc.health.v1.Health(address, grpc.credentials.createInsecure());
    const call = stub.Watch({ service: "" }, { deadline: deadline() });
    call.on("data", (reply) => { resolve(reply.status); call.cancel(); });
    call.on("error", (err) => { if (err.code !== grpc.status.CANCELLED) reject(err); });
  });
}

function listModels(queen) {
  return new Promise((resolve, reject) =>
    queen.ListModels({}, { deadline: deadline() }, (err, reply) =>
      err ? reject(err) : resolve(reply.models.map((m) => m.name))));
}

function infer(queen, request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = queen.Infer(request, { deadline: deadline() });
    call.on("data", (chunk) => chunks.push(chunk));
    call.on("error", reject);
    call.on("end", () => resolve(chunks));
  });
}

async function main() {
  const queen = new apiary.apiary.v1.Queen(address, grpc.credentials.createInsecure());
  const watch = await firstWatchStatus();
  const models = await listModels(queen);
  const chunks = await infer(queen, { model: "demo", prompt: "hello from node", max_tokens: 5 });
  let unknown = null;
  try {
    await infer(queen, { model: "nope", prompt: "x", max_tokens: 1 });
  } catch (err) {
    unknown = { code: err.code, details: err.details };
  }
  const last = chunks[chunks.length - 1];
  console.log(JSON.stringify({
    watch, models, text: chunks.map((c) => c.text).join(""),
    finish: last.finish_reason, unknown,
  }));
}

main().catch((err) => { console.error(err); process.exit(1); });
