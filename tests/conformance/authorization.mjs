// The header value and target shared by authorize.mjs and undici_authorized.mjs.
export const authorization = process.env.CONFORMANCE_AUTHORIZATION;
export const origin = process.env.CONFORMANCE_AUTHORIZATION_ORIGIN;

export function targetsGateway(url) {
  try {
    return new URL(String(url)).origin === origin;
  } catch {
    return false;
  }
}

// headers as a plain object or a flat [name, value, ...] array (both accepted by undici and node:http);
// a header the caller set itself is left alone.
export function withAuthorization(headers) {
  if (Array.isArray(headers)) {
    const names = headers.filter((_, index) => index % 2 === 0).map((name) => String(name).toLowerCase());
    return names.includes("authorization") ? headers : [...headers, "authorization", authorization];
  }
  const object = { ...(headers ?? {}) };
  const present = Object.keys(object).some((name) => name.toLowerCase() === "authorization");
  return present ? object : { ...object, authorization };
}
