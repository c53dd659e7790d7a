// Node --import preload: the conformance suite's server mode sends no Authorization header, so this adds
// $CONFORMANCE_AUTHORIZATION (e.g. "Bearer <access token>") to every request it sends to
// $CONFORMANCE_AUTHORIZATION_ORIGIN (the gateway's origin; nothing else ever sees the token).
// The suite uses three HTTP clients: the global fetch (the MCP TypeScript SDK client transport and the
// 2026-07-28 raw connection), undici.request (DNS rebinding: it sets Host itself) and node:http's
// request (SEP-2243 header validation: exact header casing).
import http from "node:http";
import { register } from "node:module";

import { authorization, origin, targetsGateway, withAuthorization } from "./authorization.mjs";

if (!authorization || !origin) {
  throw new Error("authorize.mjs needs CONFORMANCE_AUTHORIZATION and CONFORMANCE_AUTHORIZATION_ORIGIN");
}

const originalFetch = globalThis.fetch;
globalThis.fetch = function fetchWithAuthorization(input, init = {}) {
  const url = input instanceof Request ? input.url : String(input);
  if (!targetsGateway(url)) {
    return originalFetch(input, init);
  }
  const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
  if (!headers.has("authorization")) {
    headers.set("authorization", authorization);
  }
  return originalFetch(input, { ...init, headers });
};

// http.request(options[, callback]) or http.request(url[, options][, callback]).
const originalHttpRequest = http.request;
http.request = function httpRequestWithAuthorization(...args) {
  const [first, second] = args;
  if (typeof first === "string" || first instanceof URL) {
    if (targetsGateway(first)) {
      const options = second !== null && typeof second === "object" ? second : {};
      const rest = options === second ? args.slice(2) : args.slice(1);
      return originalHttpRequest.call(this, first, { ...options, headers: withAuthorization(options.headers) }, ...rest);
    }
  } else if (first !== null && typeof first === "object") {
    const host = first.hostname ?? first.host ?? "localhost";
    const port = first.port ? `:${first.port}` : "";
    if (targetsGateway(`${first.protocol ?? "http:"}//${host}${port}`)) {
      return originalHttpRequest.call(this, { ...first, headers: withAuthorization(first.headers) }, ...args.slice(1));
    }
  }
  return originalHttpRequest.apply(this, args);
};

// undici's exports are an ES module namespace (read-only): a resolve hook hands importers of "undici"
// our wrapper instead, which re-exports undici with request() adding the header.
register("./undici_hooks.mjs", import.meta.url);
