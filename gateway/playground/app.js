import * as P from "./protocol.js"; console.log(P.PROTOCOL_VERSION);
