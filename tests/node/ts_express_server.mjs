// An MCP server built the way the official TypeScript SDK (@modelcontextprotocol/sdk) documents
// deploying one: createMcpExpressApp() (Express with express.json() body parsing and the localhost
// DNS-rebinding guard), one StreamableHTTPServerTransport per session with the SDK's example event
// store (resumable streams), and McpServer tools, with the parsed body handed to
// transport.handleRequest(req, res, req.body).
//
// It is an upstream for the gateway's differential tests: express.json() honours Content-Type
// charsets (any "utf-*" that iconv-lite knows, utf-7 included) and Content-Encoding (gzip, deflate,
// br), and JSON.parse keeps the last of duplicate keys, so this server may read a body differently
// from the gateway. Test hooks (not MCP): GET /_test/executed lists the tools that ran, in order;
// POST /_test/reset forgets them.
//
// Start with `node --import ./listen_loopback.mjs ts_express_server.mjs` and PORT=0: the preload pins
// the socket to 127.0.0.1, reports the port on stderr and exits on stdin EOF (EXIT_ON_STDIN_EOF=1).
import { randomUUID } from 'node:crypto';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { createMcpExpressApp } from '@modelcontextprotocol/sdk/server/express.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';

const executed = [];

function buildServer() {
    const server = new McpServer({ name: 'ts-express-test-upstream', version: '1.0.0' });
    const tool = (name, description, inputSchema, run) =>
        server.registerTool(name, { description, inputSchema }, async args => {
            executed.push(name);
            return { content: [{ type: 'text', text: run(args) }] };
        });
    tool('echo', 'Return the text unchanged', { text: z.string() }, args => args.text);
    tool('secret_tool', 'Denied by the gateway policy', {}, () => 'secret_tool executed');
    tool('delete_everything', 'Denied by the gateway policy', {}, () => 'deleted nothing (test upstream)');
    return server;
}

const transports = new Map();
const app = createMcpExpressApp({ host: '127.0.0.1' });

function badRequest(res, message) {
    res.status(400).json({ jsonrpc: '2.0', id: null, error: { code: -32000, message } });
}

// Resumability (Streamable HTTP "Resumability and Redelivery") needs events replayed in the order they
// were stored. The SDK's example store orders ids `${stream}_${Date.now()}_${random}` as strings, so two
// events of one millisecond (a priming event and the result right after it) come back in random order
// and the result is sometimes not replayed at all. Ids here carry a counter instead.
class OrderedEventStore {
    constructor() {
        this.events = [];
        this.sequence = 0;
    }

    async storeEvent(streamId, message) {
        this.sequence += 1;
        const eventId = `${streamId}_${String(this.sequence).padStart(12, '0')}`;
        this.events.push({ eventId, streamId, message });
        return eventId;
    }

    async getStreamIdForEventId(eventId) {
        return this.events.find(event => event.eventId === eventId)?.streamId;
    }

    async replayEventsAfter(lastEventId, { send }) {
        const index = this.events.findIndex(event => event.eventId === lastEventId);
        if (index < 0) {
            return '';
        }
        const { streamId } = this.events[index];
        for (const event of this.events.slice(index + 1)) {
            if (event.streamId === streamId) {
                await send(event.eventId, event.message);
            }
        }
        return streamId;
    }
}

app.post('/mcp', async (req, res) => {
    const sessionId = req.headers['mcp-session-id'];
    let transport = sessionId === undefined ? undefined : transports.get(sessionId);
    if (transport === undefined) {
        if (sessionId !== undefined || !isInitializeRequest(req.body)) {
            badRequest(res, 'Bad Request: No valid session ID provided');
            return;
        }
        transport = new StreamableHTTPServerTransport({
            sessionIdGenerator: () => randomUUID(),
            eventStore: new OrderedEventStore(),
            onsessioninitialized: id => transports.set(id, transport),
        });
        transport.onclose = () => transports.delete(transport.sessionId);
        await buildServer().connect(transport);
    }
    await transport.handleRequest(req, res, req.body);
});

async function sessionRequest(req, res) {
    const transport = transports.get(req.headers['mcp-session-id']);
    if (transport === undefined) {
        badRequest(res, 'Bad Request: No valid session ID provided');
        return;
    }
    await transport.handleRequest(req, res);
}

app.get('/mcp', sessionRequest);
app.delete('/mcp', sessionRequest);
app.get('/_test/executed', (req, res) => res.json(executed));
app.post('/_test/reset', (req, res) => {
    executed.length = 0;
    res.status(204).end();
});

app.listen(Number(process.env.PORT || 0), '127.0.0.1');
