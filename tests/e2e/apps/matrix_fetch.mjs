// Node.js fetch (undici) client driver of the HTTP matrix end-to-end test: runs a plan of
// requests one after another and prints a JSON list with one result per request.
//
//     node matrix_fetch.mjs PLAN_JSON
//
// PLAN_JSON: {"requests": [{"method", "url", "headers": {..}, "body_size": N}, ...]}
// Result per request: status, body_len, local_port (null: fetch does not expose it), client_ns
// (hrtime around the whole exchange), wall_start_ns / wall_end_ns.
const plan = JSON.parse(process.argv[2]);
// Wall clock with sub-millisecond resolution (Date.now() has whole milliseconds).
const wallNs = () => Math.round((performance.timeOrigin + performance.now()) * 1e6);
const out = [];
for (const req of plan.requests) {
  const init = { method: req.method, headers: req.headers || {} };
  if (req.body_size) init.body = Buffer.alloc(req.body_size, 'x');
  const wallStart = wallNs();
  const start = process.hrtime.bigint();
  const resp = await fetch(req.url, init);
  const body = Buffer.from(await resp.arrayBuffer());
  const clientNs = process.hrtime.bigint() - start;
  out.push({ status: resp.status, body_len: body.length, local_port: null, remote_ip: null,
             client_ns: Number(clientNs), wall_start_ns: wallStart, wall_end_ns: wallNs() });
}
console.log(JSON.stringify(out));
