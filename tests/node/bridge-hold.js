// Asterisk's bridge-hold example, run against the ARI simulator with the npm ari-client.
//
// Usage: node bridge-hold.js URL USER PASSWORD APP
// Prints one line per step (READY, BRIDGES, CREATED, STASIS_START, ADDED, MOH_STARTED,
// STASIS_END) and exits 0 after StasisEnd; any failure prints FAIL and exits 1.
'use strict';

const ari = require('ari-client');

const [url, user, pass, app] = process.argv.slice(2);

function log(line) {
  process.stdout.write(line + '\n');
}

function fail(err) {
  log('FAIL ' + (err && err.stack ? err.stack : String(err)));
  process.exit(1);
}

const deadline = setTimeout(() => fail('timed out'), 30000);

async function main() {
  const client = await ari.connect(url, user, pass);

  const bridges = await client.bridges.list();
  log('BRIDGES ' + bridges.length);
  let holding = bridges.find((b) => b.bridge_type === 'holding');
  if (!holding) {
    holding = await client.bridges.create({ type: 'holding' });
    log('CREATED ' + holding.id + ' ' + holding.bridge_type);
  }

  client.on('StasisStart', (event, channel) => {
    log('STASIS_START ' + channel.id + ' ' + JSON.stringify(event.args));
    (async () => {
      await channel.answer();
      await holding.addChannel({ channel: channel.id });
      log('ADDED ' + channel.id);
      await holding.startMoh();
      log('MOH_STARTED ' + holding.id);
    })().catch(fail);
  });

  client.on('StasisEnd', (event, channel) => {
    log('STASIS_END ' + channel.id);
    clearTimeout(deadline);
    client.stop();
    process.exit(0);
  });

  await client.start(app);
  log('READY');
}

main().catch(fail);
