// The Node.js `http` service of the HTTP matrix end-to-end test.
//
//     node matrix_node.js PORT HOST [HOST...]      e.g. node matrix_node.js 8080 127.0.0.1 ::1
//
// One server per HOST on the same PORT, all serving the matrix API:
//   GET  /hello       200 {"hello":"world"}
//   GET  /items/<n>   200 {"id":n}
//   GET  /fail        500 {"error":"injected failure"}
//   GET  /missing     404 (no such route)
//   GET  /big         200, 5 MiB application/octet-stream (HEAD too: no body)
//   GET  /stream      200, chunked: 3 chunks of 11 bytes ({"part":1}\n ...)
//   POST /echo        200, the request body
// Every response but /stream carries Content-Length, so a span's body sizes are exact.
'use strict';
const http = require('http');

const BIG = Buffer.alloc(5 * 1024 * 1024, '0123456789abcdef');

function reply(res, status, type, body) {
  const buf = Buffer.isBuffer(body) ? body : Buffer.from(body);
  res.writeHead(status, { 'Content-Type': type, 'Content-Length': buf.length });
  res.end(buf);
}

function handle(req, res) {
  const path = req.url.split('?')[0];
  const item = /^\/items\/(\d+)$/.exec(path);
  if (req.method === 'POST' && path === '/echo') {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => reply(res, 200, 'application/octet-stream', Buffer.concat(chunks)));
    return;
  }
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    return reply(res, 405, 'text/plain', 'GET only\n');
  }
  if (path === '/stream') {
    res.writeHead(200, { 'Content-Type': 'application/x-ndjson' });  // no length: chunked
    let part = 0;
    const next = () => {
      part += 1;
      res.write(`{"part":${part}}\n`);
      if (part < 3) setTimeout(next, 5); else res.end();
    };
    return next();
  }
  if (path === '/hello') return reply(res, 200, 'application/json', '{"hello":"world"}');
  if (item) return reply(res, 200, 'application/json', `{"id":${Number(item[1])}}`);
  if (path === '/fail') return reply(res, 500, 'application/json', '{"error":"injected failure"}');
  if (path === '/big') return reply(res, 200, 'application/octet-stream', BIG);
  return reply(res, 404, 'text/plain', 'not found\n');
}

const [port, ...hosts] = process.argv.slice(2);
if (!port || hosts.length === 0) {
  console.error('usage: node matrix_node.js PORT HOST [HOST...]');
  process.exit(2);
}
for (const host of hosts) {
  const server = http.createServer({ keepAliveTimeout: 30000 }, handle);
  server.on('error', (err) => { console.error(`${host}:${port}: ${err}`); process.exit(1); });
  server.listen({ port: Number(port), host, ipv6Only: host.includes(':') },
                () => console.log(`serving on ${host}:${port}`));
}
