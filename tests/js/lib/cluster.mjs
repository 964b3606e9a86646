// A private fleet for tests: its own Postgres database and Redis/RabbitMQ prefix per run, so
// runs never collide, and N gateways sharing them.
import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { startGateway } from './gateway.mjs';

const PG_HOST = process.env.CONFAB_TEST_PG_HOST ?? '127.0.0.1';
const PG_PORT = Number(process.env.CONFAB_TEST_PG_PORT ?? 5432);
export const REDIS_URL = process.env.CONFAB_TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
export const AMQP_PORT = Number(process.env.CONFAB_TEST_AMQP_PORT ?? 5672);
export const PG_PORT_DEFAULT = PG_PORT;

function psql(sql) {
  execFileSync('psql', ['-h', PG_HOST, '-p', String(PG_PORT), '-U', 'postgres', '-d', 'postgres', '-v', 'ON_ERROR_STOP=1', '-qc', sql], { stdio: 'pipe' });
}

export function createFleetBackends() {
  const id = randomUUID().replaceAll('-', '').slice(0, 16);
  const database = `confab_e2e_${id}`;
  psql(`CREATE DATABASE ${database}`);
  return {
    database,
    prefix: `confab-e2e-${id}`,
    databaseUrl: (port = PG_PORT) => `postgres://postgres@${PG_HOST}:${port}/${database}`,
    amqpUrl: (port = AMQP_PORT) => `amqp://guest:guest@127.0.0.1:${port}/%2f`,
    drop() {
      try { psql(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`); } catch { /* best effort */ }
      try {
        const keys = execFileSync('redis-cli', ['-u', REDIS_URL, '--scan', '--pattern', `confab-e2e-${id}:*`]).toString().split('\n').filter(Boolean);
        for (let i = 0; i < keys.length; i += 200) execFileSync('redis-cli', ['-u', REDIS_URL, 'DEL', ...keys.slice(i, i + 200)]);
      } catch { /* keys expire anyway */ }
    },
  };
}

/** A gateway of the fleet; `pgPort`/`amqpPort` let a fault proxy sit in between. */
export function startFleetGateway(backends, { pgPort, amqpPort, bus = 'rabbitmq', env = {}, bin } = {}) {
  return startGateway({
    bin,
    env: {
      CONFAB_DATABASE_URL: backends.databaseUrl(pgPort),
      CONFAB_DATABASE_POOL_SIZE: '4',
      CONFAB_DATABASE_TIMEOUT_MS: '1500',
      CONFAB_REDIS_URL: REDIS_URL,
      CONFAB_AMQP_URL: backends.amqpUrl(amqpPort),
      CONFAB_BUS: bus,
      CONFAB_BACKEND_PREFIX: backends.prefix,
      CONFAB_PRESENCE_TTL_MS: '2000',
      CONFAB_PRESENCE_GRACE_MS: '300',
      CONFAB_MESSAGES_PER_SECOND: '200',
      CONFAB_MESSAGE_BURST: '400',
      ...env,
    },
  });
}
