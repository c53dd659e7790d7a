#!/usr/bin/env node
// Test driver: the official MCP TypeScript SDK client (@modelcontextprotocol/client 2.x) talking to an
// MCP server (normally through our gateway) with Enterprise-Managed Authorization (ID-JAG):
//
//   leg 2: requestJwtAuthorizationGrant()  -> RFC 8693 token exchange at the IdP, ID token -> ID-JAG
//   leg 3: CrossAppAccessProvider          -> RFC 7523 jwt-bearer grant at the gateway's AS,
//                                            after RFC 9728 discovery starting from the gateway's 401
//
// Configured only by environment variables; prints exactly ONE JSON line on stdout and exits
// 0 ({"ok": true, ...}) or 1 ({"ok": false, "error": ..., "stage": ...}). Diagnostics go to stderr.
// Tokens, secrets and assertions are never printed (they are also scrubbed from the output line).
//
// Environment:
//   MCP_URL              required  MCP endpoint (gateway route URL)
//   TRANSPORT            optional  "streamable-http" (default) | "sse" (deprecated HTTP+SSE transport)
//   NO_AUTH              optional  "1": no auth provider at all (smoke tests against an open server)
//   IDP_TOKEN_ENDPOINT   required* IdP token endpoint for the RFC 8693 token exchange
//   ID_TOKEN             required* OIDC ID token used as subject_token
//   IDP_CLIENT_ID        required* client_id at the IdP
//   IDP_CLIENT_SECRET    optional  client_secret at the IdP (omitted from the request when empty)
//   CLIENT_ID            required* client_id at the gateway's authorization server
//   CLIENT_SECRET        required* client_secret at the gateway's authorization server (unless
//                                  CLIENT_PRIVATE_KEY_JWK is set)
//   CLIENT_PRIVATE_KEY_JWK optional private JWK (JSON): authenticate with private_key_jwt (RFC 7523
//                                  §2.2) via the SDK's createPrivateKeyJwtAuth instead of a secret
//   CLIENT_KEY_ALG       optional  JWS algorithm for CLIENT_PRIVATE_KEY_JWK (default ES256)
//   EXPECTED_ISSUER      required* gateway AS issuer (CrossAppAccessProvider `expectedIssuer`)
//   SCOPE                optional  scope sent to the IdP in leg 2 (default: the scope the provider
//                                  passes to the assertion callback, i.e. WWW-Authenticate/PRM scope)
//   IDP_AUDIENCE         optional  override the leg-2 `audience` (default: ctx.authorizationServerUrl)
//   IDP_RESOURCE         optional  override the leg-2 `resource` (default: ctx.resourceUrl)
//   CALL_TOOL            optional  tool name to call after tools/list
//   CALL_ARGS            optional  JSON object of arguments for CALL_TOOL (default {})
//   VERSION_NEGOTIATION  optional  "legacy" (SDK default) | "auto" | a protocol version to pin
//   TERMINATE_SESSION    optional  "1": DELETE the Streamable HTTP session before closing
//   TIMEOUT_MS           optional  overall deadline in ms (default 30000)
//   (* not needed when NO_AUTH=1)
//
// Success output:
//   {"ok": true, "transport": ..., "tools": [names], "call": <CallToolResult>|null,
//    "assertionRequests": [{"authorizationServerUrl", "resourceUrl", "scope"}],
//    "idpGrants": [{"scope", "expiresIn"}], "tokenRequests": N, "tokenExchangeRequests": N,
//    "requests": [{"method", "url", "status", ...}], "serverInfo": {...}, "protocolVersion": ...,
//    "transportErrors": [...], "durationMs": N}

const started = Date.now();
const env = process.env;
const timeoutMs = Number(env.TIMEOUT_MS || 30000);

const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';

const secrets = new Set();
function addSecret(value) {
    if (typeof value === 'string' && value.length >= 4) secrets.add(value);
}
for (const name of ['ID_TOKEN', 'CLIENT_SECRET', 'IDP_CLIENT_SECRET']) addSecret(env[name]);
if (env.CLIENT_PRIVATE_KEY_JWK) addSecret(JSON.parse(env.CLIENT_PRIVATE_KEY_JWK).d);

const requests = [];
const assertionRequests = [];
const idpGrants = [];
const transportErrors = [];
let stage = 'init';
let finished = false;
let provider;

function redact(text) {
    let out = String(text);
    for (const secret of secrets) {
        out = out.split(secret).join('[REDACTED]');
        const escaped = JSON.stringify(secret).slice(1, -1);
        if (escaped !== secret) out = out.split(escaped).join('[REDACTED]');
    }
    return out;
}

const SENSITIVE_PARAM = /token|secret|assertion|code|password|key|jwt/i;
function safeUrl(raw) {
    try {
        const url = new URL(raw);
        for (const name of [...url.searchParams.keys()]) {
            if (SENSITIVE_PARAM.test(name)) url.searchParams.set(name, '[REDACTED]');
        }
        url.username = '';
        url.password = '';
        return url.href;
    } catch {
        return '[unparseable URL]';
    }
}

function describeError(error) {
    const parts = [];
    let current = error;
    for (let depth = 0; current && depth < 5; depth++) {
        parts.push(current instanceof Error ? `${current.name}: ${current.message}` : String(current));
        current = current instanceof Error ? current.cause : undefined;
    }
    return parts.join(' <- caused by: ');
}

function finish(payload, exitCode) {
    if (finished) return;
    finished = true;
    try {
        const access = provider?.tokens?.();
        addSecret(access?.access_token);
        addSecret(access?.refresh_token);
    } catch {
        // ignore: best effort
    }
    const line = redact(JSON.stringify({ ...payload, durationMs: Date.now() - started }));
    process.stdout.write(`${line}\n`, () => process.exit(exitCode));
}

function fail(failedStage, error) {
    finish(
        {
            ok: false,
            stage: failedStage,
            error: describeError(error),
            errorCode: error?.code ?? null,
            assertionRequests,
            idpGrants,
            tokenRequests: countGrant(JWT_BEARER),
            tokenExchangeRequests: countGrant(TOKEN_EXCHANGE),
            requests,
            transportErrors
        },
        1
    );
}

function countGrant(grantType) {
    return requests.filter(r => r.grantType === grantType).length;
}

const deadline = setTimeout(() => fail(stage, new Error(`xaa_client timed out after ${timeoutMs} ms (stage ${stage})`)), timeoutMs);
process.on('unhandledRejection', error => fail(stage, error));
process.on('uncaughtException', error => fail(stage, error));

// ---- HTTP recording: every request the SDK makes goes through this wrapper ----------------------
const realFetch = globalThis.fetch;

function headersOf(input, init) {
    if (init?.headers !== undefined) return new Headers(init.headers);
    if (input instanceof Request) return input.headers;
    return new Headers();
}

function describeBody(body, headers, entry) {
    let text;
    if (typeof body === 'string') text = body;
    else if (body instanceof URLSearchParams) text = body.toString();
    else return;
    const contentType = headers.get('content-type') || '';
    if (body instanceof URLSearchParams || contentType.includes('application/x-www-form-urlencoded')) {
        const form = new URLSearchParams(text);
        entry.formKeys = [...new Set(form.keys())];
        const grantType = form.get('grant_type');
        if (grantType) entry.grantType = grantType;
    } else if (contentType.includes('json')) {
        try {
            const parsed = JSON.parse(text);
            const messages = Array.isArray(parsed) ? parsed : [parsed];
            entry.rpc = messages.map(m => m?.method ?? (m && 'result' in m ? 'response' : 'error'));
        } catch {
            // not JSON: nothing to record
        }
    }
}

async function recordingFetch(input, init) {
    const url = input instanceof Request ? input.url : String(input);
    const method = (init?.method ?? (input instanceof Request ? input.method : 'GET')).toUpperCase();
    const headers = headersOf(input, init);
    const entry = { method, url: safeUrl(url), status: null };
    const authorization = headers.get('authorization');
    if (authorization) entry.authScheme = authorization.split(' ')[0];
    describeBody(init?.body, headers, entry);
    requests.push(entry);
    try {
        const response = await realFetch(input, init);
        entry.status = response.status;
        const challenge = response.headers.get('www-authenticate');
        if (challenge) entry.wwwAuthenticate = challenge;
        return response;
    } catch (error) {
        entry.error = describeError(error);
        throw error;
    }
}
globalThis.fetch = recordingFetch;

// ---- configuration --------------------------------------------------------------------------------
function required(name) {
    const value = env[name];
    if (!value) throw new Error(`environment variable ${name} is required`);
    return value;
}

async function main() {
    stage = 'config';
    const mcpUrl = new URL(required('MCP_URL'));
    const transportKind = env.TRANSPORT || 'streamable-http';
    if (transportKind !== 'streamable-http' && transportKind !== 'sse') {
        throw new Error(`TRANSPORT must be "streamable-http" or "sse", got ${JSON.stringify(transportKind)}`);
    }
    const noAuth = env.NO_AUTH === '1';
    let callArgs = {};
    if (env.CALL_ARGS) {
        callArgs = JSON.parse(env.CALL_ARGS);
        if (!callArgs || typeof callArgs !== 'object' || Array.isArray(callArgs)) throw new Error('CALL_ARGS must be a JSON object');
    }
    let versionNegotiation;
    if (env.VERSION_NEGOTIATION) {
        const mode = env.VERSION_NEGOTIATION;
        versionNegotiation = { mode: mode === 'legacy' || mode === 'auto' ? mode : { pin: mode } };
    }

    stage = 'import';
    const sdk = await import('@modelcontextprotocol/client');
    const { Client, StreamableHTTPClientTransport, SSEClientTransport, CrossAppAccessProvider, requestJwtAuthorizationGrant, createPrivateKeyJwtAuth } =
        sdk;

    stage = 'config';
    if (!noAuth) {
        const idpTokenEndpoint = required('IDP_TOKEN_ENDPOINT');
        const idToken = required('ID_TOKEN');
        const idpClientId = required('IDP_CLIENT_ID');
        const idpClientSecret = env.IDP_CLIENT_SECRET || undefined;
        const privateKeyJwk = env.CLIENT_PRIVATE_KEY_JWK ? JSON.parse(env.CLIENT_PRIVATE_KEY_JWK) : undefined;
        provider = new CrossAppAccessProvider({
            clientId: required('CLIENT_ID'),
            clientSecret: privateKeyJwk ? undefined : required('CLIENT_SECRET'),
            expectedIssuer: required('EXPECTED_ISSUER'),
            clientName: 'xaa-e2e-test-client',
            fetchFn: recordingFetch,
            assertion: async ctx => {
                const previousStage = stage;
                stage = 'assertion';
                assertionRequests.push({
                    authorizationServerUrl: ctx.authorizationServerUrl,
                    resourceUrl: ctx.resourceUrl,
                    scope: ctx.scope ?? null
                });
                const result = await requestJwtAuthorizationGrant({
                    tokenEndpoint: idpTokenEndpoint,
                    audience: env.IDP_AUDIENCE || ctx.authorizationServerUrl,
                    resource: env.IDP_RESOURCE || ctx.resourceUrl,
                    idToken,
                    clientId: idpClientId,
                    clientSecret: idpClientSecret,
                    scope: env.SCOPE || ctx.scope,
                    fetchFn: ctx.fetchFn
                });
                addSecret(result.jwtAuthGrant);
                idpGrants.push({ scope: result.scope ?? null, expiresIn: result.expiresIn ?? null });
                stage = previousStage;
                return result.jwtAuthGrant;
            }
        });
        if (privateKeyJwk) {
            // The SDK's own private_key_jwt signer (iss = sub = client_id, aud = the AS issuer).
            provider.addClientAuthentication = createPrivateKeyJwtAuth({
                issuer: required('CLIENT_ID'),
                subject: required('CLIENT_ID'),
                privateKey: privateKeyJwk,
                alg: env.CLIENT_KEY_ALG || 'ES256'
            });
        }
    }

    const transportOptions = { fetch: recordingFetch };
    if (provider) transportOptions.authProvider = provider;
    const transport =
        transportKind === 'sse' ? new SSEClientTransport(mcpUrl, transportOptions) : new StreamableHTTPClientTransport(mcpUrl, transportOptions);

    const client = new Client({ name: 'xaa-e2e-test-client', version: '0.0.0' }, versionNegotiation ? { versionNegotiation } : undefined);
    client.onerror = error => transportErrors.push(describeError(error));

    stage = 'connect';
    await client.connect(transport);

    stage = 'listTools';
    const listed = await client.listTools();
    const tools = listed.tools.map(t => t.name);

    let call = null;
    if (env.CALL_TOOL) {
        stage = 'callTool';
        call = await client.callTool({ name: env.CALL_TOOL, arguments: callArgs });
    }

    const serverInfo = client.getServerVersion() ?? null;
    const protocolVersion = client.getNegotiatedProtocolVersion?.() ?? null;

    stage = 'close';
    if (env.TERMINATE_SESSION === '1' && transport instanceof StreamableHTTPClientTransport) {
        await transport.terminateSession();
    }
    await client.close();

    clearTimeout(deadline);
    finish(
        {
            ok: true,
            transport: transportKind,
            tools,
            call,
            assertionRequests,
            idpGrants,
            tokenRequests: countGrant(JWT_BEARER),
            tokenExchangeRequests: countGrant(TOKEN_EXCHANGE),
            requests,
            serverInfo,
            protocolVersion,
            transportErrors
        },
        0
    );
}

main().catch(error => fail(stage, error));
