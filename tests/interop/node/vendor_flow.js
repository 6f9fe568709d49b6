// The default profile's sample device flow (docs/CONTRACT.md §13) with the client it uses,
// node-coap-client:
// GET coap://HOST:PORT/bootstrap → "identity,psk,coaps-url", then POST over coaps:// with those
// credentials. Prints one JSON line with what happened; exits 0 only if the POST got 2.04.
//
// usage: node vendor_flow.js <bootstrap-url|-> <coaps-url> [identity psk] <payload>
//   bootstrap-url "-": skip bootstrap and use the identity and psk given on the command line.
"use strict";
const coap = require("node-coap-client").CoapClient;

const options = { keepAlive: true, confirmable: true, retransmit: false };

function fail(step, error) {
    console.log(JSON.stringify({ ok: false, step, error: String(error) }));
    coap.reset();
    process.exit(1);
}

async function bootstrap(url) {
    const result = await coap.request(url, "get", undefined, options);
    const code = result.code.toString();
    const payload = result.payload ? result.payload.toString() : "";
    if (code !== "2.05") throw new Error(`bootstrap answered ${code}`);
    const [identity, psk, endpoint] = payload.trim().split(",");
    return { identity, psk, endpoint, code };
}

async function main() {
    const args = process.argv.slice(2);
    const bootstrapUrl = args[0];
    let coapsUrl = args[1];
    let creds;
    let bootstrapCode = null;
    let payload;
    if (bootstrapUrl === "-") {
        creds = { identity: args[2], psk: args[3] };
        payload = args[4];
    } else {
        try {
            creds = await bootstrap(bootstrapUrl);
            bootstrapCode = creds.code;
        } catch (e) {
            return fail("bootstrap", e);
        }
        payload = args[2];
    }
    coap.setSecurityParams(coapsUrl, { psk: { [creds.identity]: creds.psk } });
    const connected = await coap.tryToConnect(coapsUrl);
    if (connected !== true) return fail("handshake", connected);
    let result;
    try {
        result = await coap.request(coapsUrl, "post", Buffer.from(payload), options);
    } catch (e) {
        return fail("post", e);
    }
    const code = result.code.toString();
    console.log(JSON.stringify({ ok: code === "2.04", bootstrap: bootstrapCode,
                                 identity: creds.identity, code }));
    coap.reset();
    process.exit(code === "2.04" ? 0 : 1);
}

main().catch((e) => fail("unexpected", e));
