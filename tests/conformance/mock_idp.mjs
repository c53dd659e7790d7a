// An enterprise IdP we did not write: npm oauth2-mock-server (OIDC discovery, JWKS, signed ID tokens),
// plus the one thing it lacks, ours and small: the RFC 8693 token exchange of an ID token for an ID-JAG
// (draft-ietf-oauth-identity-assertion-authz-grant "Token Exchange"), at POST /token-exchange, signed
// with the mock's own keys so the gateway verifies it against the mock's published JWKS.
//
// Environment: IDP_CLIENT_ID (the client allowed to exchange), RESOURCE_CLIENT_ID (its client_id at the
// gateway, the ID-JAG's client_id claim), GROUPS (comma-separated, the ID-JAG's groups claim).
// Prints `MOCK_IDP_LISTENING <issuer URL>` on stdout once it listens on 127.0.0.1; exits when stdin closes.
import { randomUUID } from "node:crypto";

import { createLocalJWKSet, jwtVerify } from "jose";
import { OAuth2Server } from "oauth2-mock-server";

const TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange";
const ID_JAG = "urn:ietf:params:oauth:token-type:id-jag";
const ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token";
const ID_JAG_TTL_SECONDS = 300;

const { IDP_CLIENT_ID, RESOURCE_CLIENT_ID, GROUPS = "" } = process.env;
if (!IDP_CLIENT_ID || !RESOURCE_CLIENT_ID) {
  throw new Error("mock_idp.mjs needs IDP_CLIENT_ID and RESOURCE_CLIENT_ID");
}

const server = new OAuth2Server();
await server.issuer.keys.generate("RS256");

function reply(res, status, body) {
  res.writeHead(status, { "Content-Type": "application/json", "Cache-Control": "no-store" });
  res.end(JSON.stringify(body));
}

function refuse(res, error, description) {
  reply(res, 400, { error, error_description: description });
}

server.service.addRoute("POST", "/token-exchange", async (req, res) => {
  const form = req.body ?? {};
  if (form.grant_type !== TOKEN_EXCHANGE) return refuse(res, "unsupported_grant_type", "token exchange only");
  if (form.client_id !== IDP_CLIENT_ID) return refuse(res, "invalid_client", "unknown client");
  if (form.requested_token_type !== ID_JAG) return refuse(res, "invalid_request", `requested_token_type must be ${ID_JAG}`);
  if (form.subject_token_type !== ID_TOKEN) return refuse(res, "invalid_request", `subject_token_type must be ${ID_TOKEN}`);
  if (typeof form.audience !== "string") return refuse(res, "invalid_request", "missing audience");
  let subject;
  try {
    const keys = createLocalJWKSet({ keys: server.issuer.keys.toJSON() }); // public fields only
    const expected = { issuer: server.issuer.url, audience: IDP_CLIENT_ID };
    ({ payload: subject } = await jwtVerify(form.subject_token, keys, expected));
  } catch (error) {
    return refuse(res, "invalid_grant", `subject_token: ${error.message}`);
  }
  const idJag = await server.issuer.buildToken({
    expiresIn: ID_JAG_TTL_SECONDS,
    scopesOrTransform: (header, payload) => {
      header.typ = "oauth-id-jag+jwt";
      Object.assign(payload, {
        sub: subject.sub,
        aud: form.audience,
        client_id: RESOURCE_CLIENT_ID,
        jti: randomUUID(),
        groups: GROUPS ? GROUPS.split(",") : [],
        ...(form.resource ? { resource: form.resource } : {}),
        ...(form.scope ? { scope: form.scope } : {}),
      });
    },
  });
  reply(res, 200, { issued_token_type: ID_JAG, access_token: idJag, token_type: "N_A", expires_in: ID_JAG_TTL_SECONDS });
});

await server.start(0, "127.0.0.1");
// The mock names itself after "localhost", which may resolve to ::1; it listens on 127.0.0.1 only.
server.issuer.url = `http://127.0.0.1:${server.address().port}`;
process.stdout.write(`MOCK_IDP_LISTENING ${server.issuer.url}\n`);
process.stdin.resume();
process.stdin.on("end", async () => {
  await server.stop();
  process.exit(0);
});
