// A TCP fault proxy for outage tests: sits between a gateway and a shared service and can cut
// (reset every connection and refuse new ones) and restore, without touching the service.
import net from 'node:net';

export async function startFaultProxy(targetPort, targetHost = '127.0.0.1') {
  let cut = false;
  const sockets = new Set();
  const server = net.createServer((client) => {
    if (cut) { client.resetAndDestroy(); return; }
    const upstream = net.connect(targetPort, targetHost);
    sockets.add(client); sockets.add(upstream);
    const drop = () => {
      sockets.delete(client); sockets.delete(upstream);
      client.destroy(); upstream.destroy();
    };
    client.on('error', drop); upstream.on('error', drop);
    client.on('close', drop); upstream.on('close', drop);
    client.pipe(upstream); upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: server.address().port,
    /** Resets every open connection and refuses new ones until restore(). */
    cut() {
      cut = true;
      for (const s of sockets) s.resetAndDestroy();
      sockets.clear();
    },
    restore() { cut = false; },
    close() { this.cut(); return new Promise((resolve) => server.close(resolve)); },
  };
}
