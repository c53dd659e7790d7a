// undici with request() adding the gateway's Authorization header (see authorize.mjs).
import * as undici from "undici";

import { targetsGateway, withAuthorization } from "./authorization.mjs";

export * from "undici";

export function request(url, options = {}) {
  if (!targetsGateway(url)) {
    return undici.request(url, options);
  }
  return undici.request(url, { ...options, headers: withAuthorization(options.headers) });
}
