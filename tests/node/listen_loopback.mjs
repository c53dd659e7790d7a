// Preload for test servers we do not control (server-everything), loaded with
// `node --import <this file> ...`.
//
// server-everything calls `app.listen(process.env.PORT || 3001, cb)` with no host, i.e. it
// would listen on every interface and, with PORT=0, only log "listening on port 0". This preload:
//   * forces every TCP listen() in the process onto LISTEN_HOST (default 127.0.0.1), and
//   * once the socket is bound, writes one line to stderr:
//       MCP_TEST_LISTENING {"host":"127.0.0.1","port":NNNNN}
//     so the Python side can use PORT=0 and learn the real port without races or polling;
//   * with EXIT_ON_STDIN_EOF=1, exits when stdin reaches EOF, so the server cannot outlive a test
//     run that dies without stopping it (the launcher keeps the write end of the pipe open).
import net from 'node:net';

const HOST = process.env.LISTEN_HOST || '127.0.0.1';
const MARKER = 'MCP_TEST_LISTENING';
const originalListen = net.Server.prototype.listen;

function isPort(value) {
    return typeof value === 'number' || (typeof value === 'string' && /^\d+$/.test(value));
}

net.Server.prototype.listen = function listenOnLoopback(...args) {
    const first = args[0];
    if (isPort(first)) {
        // listen(port[, host][, backlog][, callback])
        const callback = args.find(a => typeof a === 'function');
        args = [{ port: Number(first), host: HOST }];
        if (callback) args.push(callback);
    } else if (first && typeof first === 'object' && first.path === undefined && first.fd === undefined && !first._handle) {
        // listen(options[, callback]) for TCP
        args[0] = { ...first, host: HOST };
    }
    this.once('listening', () => {
        const address = this.address();
        if (address && typeof address === 'object') {
            process.stderr.write(`${MARKER} ${JSON.stringify({ host: address.address, port: address.port })}\n`);
        }
    });
    return originalListen.apply(this, args);
};

if (process.env.EXIT_ON_STDIN_EOF === '1') {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
}
