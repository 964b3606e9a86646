// A TCP fault proxy for outage tests: sits between a gateway and a shared service and can cut
// (drop every connection and refuse new ones) and restore, without touching the service.
// Connections are closed with destroy(), not resetAndDestroy(): on Node 20 a reset of a piped
// socket with a write in flight leaves a libuv request that never completes, and the test
// process then spins forever in its exit cleanup (seen as cluster.test.mjs timing out in CI
// after every test had passed).
import net from 'node:net';

export async function startFaultProxy(targetPort, targetHost = '127.0.0.1') {
  let cut = false;
  const sockets = new Set();
  const server = net.createServer((client) => {
    if (cut) { client.destroy(); return; }
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
    /** Closes every open connection and refuses new ones until restore(). */
    cut() {
      cut = true;
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    restore() { cut = false; },
    close() { this.cut(); return new Promise((resolve) => server.close(resolve)); },
  };
}
