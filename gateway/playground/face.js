// A 2D face drawn from the 61 values of a face frame (docs/protocol.md, section 4.5): jaw,
// lips (close, funnel, pucker, smile, frown, press, roll, stretch, upper/lower), eyes (blink,
// squint, wide, gaze from the look shapes and the eye rotations), brows, cheeks, nose, tongue
// and the head's yaw, pitch and roll. Sizes are in a 400 x 440 box, scaled to the canvas.
import { FACE } from "./protocol.js";

const SKIN = "#e8b896", LINE = "#5a3a2a", LIP = "#b5545c", MOUTH = "#3a1418";

export function drawFace(canvas, v) {
  const g = canvas.getContext("2d");
  const s = Math.min(canvas.width / 400, canvas.height / 440);
  const at = (name) => v[FACE[name]] || 0;
  g.setTransform(1, 0, 0, 1, 0, 0);
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.setTransform(s, 0, 0, s, 0, 0);
  const yaw = at("HeadYaw"), pitch = at("HeadPitch"), roll = at("HeadRoll");
  g.translate(200 + yaw * 120, 215 + pitch * 120);
  g.rotate(roll);
  const dx = Math.sin(yaw) * 45, dy = Math.sin(pitch) * 35; // features turn with the head
  const jaw = at("JawOpen");

  // neck and ears behind the head
  g.fillStyle = SKIN; g.strokeStyle = LINE; g.lineWidth = 3;
  g.fillRect(-55, 120, 110, 120); g.strokeRect(-55, 120, 110, 120);
  for (const side of [-1, 1]) {
    g.beginPath(); g.ellipse(side * 138 - dx * 0.3, 10 + dy * 0.5, 20, 38, 0, 0, 2 * Math.PI); g.fill(); g.stroke();
  }
  // head and chin: the chin drops with the jaw
  g.beginPath();
  g.ellipse(0, -10, 140, 165, 0, Math.PI, 2 * Math.PI);
  g.bezierCurveTo(140, 110 + jaw * 25, 60 + dx * 0.3, 185 + jaw * 35, dx * 0.4, 188 + jaw * 38);
  g.bezierCurveTo(-60 + dx * 0.3, 185 + jaw * 35, -140, 110 + jaw * 25, -140, -10);
  g.fill(); g.stroke();

  g.fillStyle = "#5b3a24"; // hair
  g.beginPath();
  g.ellipse(0, -10, 146, 172, 0, Math.PI * 1.02, Math.PI * 1.98);
  g.quadraticCurveTo(60 + dx, -150 + dy, -20 + dx, -118 + dy);
  g.quadraticCurveTo(-90 + dx, -120 + dy, -143, -30);
  g.fill();

  const cheekPuff = at("CheekPuff");
  for (const side of [-1, 1]) {
    const squint = at(side < 0 ? "CheekSquintLeft" : "CheekSquintRight");
    g.fillStyle = `rgba(220,120,110,${0.15 + 0.35 * squint + 0.2 * cheekPuff})`;
    g.beginPath();
    g.ellipse(side * (78 + cheekPuff * 14) + dx, 55 + dy - squint * 8, 26 + cheekPuff * 10, 16, 0, 0, 2 * Math.PI);
    g.fill();
  }
  for (const side of [-1, 1]) eye(g, side, at, dx, dy);
  for (const side of [-1, 1]) brow(g, side, at, dx, dy);

  // nose, raised by the sneer
  const sneer = (at("NoseSneerLeft") + at("NoseSneerRight")) / 2;
  g.strokeStyle = LINE; g.lineWidth = 3;
  g.beginPath();
  g.moveTo(dx * 1.1, -10 + dy);
  g.quadraticCurveTo(dx * 1.2 + 16, 40 + dy - sneer * 6, dx * 1.1 - 2, 52 + dy - sneer * 8);
  g.stroke();
  mouth(g, at, dx, dy, jaw);
}

function eye(g, side, at, dx, dy) {
  const L = side < 0; // the character's left eye is on the viewer's right: mirror the picture
  const sfx = L ? "Left" : "Right";
  const x = -side * 58 + dx, y = -20 + dy;
  const blink = at("EyeBlink" + sfx), squint = at("EyeSquint" + sfx), wide = at("EyeWide" + sfx);
  const open = Math.max(0, Math.min(1.3, 1 - blink - 0.35 * squint + 0.4 * wide));
  // gaze: the look shapes (0..1) and the eye rotations (radians)
  const lookRight = L ? at("EyeLookOutLeft") - at("EyeLookInLeft") : at("EyeLookInRight") - at("EyeLookOutRight");
  const gx = (-lookRight + (L ? at("LeftEyeYaw") : at("RightEyeYaw")) * 2) * 12;
  const gy = (at("EyeLookDown" + sfx) - at("EyeLookUp" + sfx) - (L ? at("LeftEyePitch") : at("RightEyePitch")) * 2) * 7;
  g.save();
  g.beginPath();
  g.ellipse(x, y, 28, 16 * open + 0.5, 0, 0, 2 * Math.PI);
  g.fillStyle = "#fff"; g.fill();
  g.clip();
  g.fillStyle = "#3d6e8f";
  g.beginPath(); g.arc(x + Math.max(-14, Math.min(14, gx)), y + Math.max(-7, Math.min(7, gy)), 11, 0, 2 * Math.PI); g.fill();
  g.fillStyle = "#111";
  g.beginPath(); g.arc(x + Math.max(-14, Math.min(14, gx)), y + Math.max(-7, Math.min(7, gy)), 5, 0, 2 * Math.PI); g.fill();
  g.restore();
  g.strokeStyle = LINE; g.lineWidth = 2.5;
  g.beginPath(); g.ellipse(x, y, 28, 16 * open + 0.5, 0, Math.PI, 2 * Math.PI); g.stroke(); // upper lid
  if (open < 0.15) { g.beginPath(); g.moveTo(x - 28, y); g.lineTo(x + 28, y); g.stroke(); }
}

function brow(g, side, at, dx, dy) {
  const sfx = side < 0 ? "Left" : "Right";
  const inner = at("BrowInnerUp") * 16 - at("BrowDown" + sfx) * 12;
  const outer = at("BrowOuterUp" + sfx) * 16 - at("BrowDown" + sfx) * 6;
  const xi = -side * 22 + dx, xo = -side * 92 + dx, y = -58 + dy;
  g.strokeStyle = "#4a2e1e"; g.lineWidth = 7; g.lineCap = "round";
  g.beginPath(); g.moveTo(xi, y - inner); g.quadraticCurveTo((xi + xo) / 2, y - 10 - (inner + outer) / 2, xo, y + 4 - outer); g.stroke();
}

function mouth(g, at, dx, dy, jaw) {
  const smile = (at("MouthSmileLeft") + at("MouthSmileRight")) / 2;
  const frown = (at("MouthFrownLeft") + at("MouthFrownRight")) / 2;
  const stretch = (at("MouthStretchLeft") + at("MouthStretchRight")) / 2;
  const press = (at("MouthPressLeft") + at("MouthPressRight")) / 2;
  const funnel = at("MouthFunnel"), pucker = at("MouthPucker"), close = at("MouthClose");
  const roll = (at("MouthRollLower") + at("MouthRollUpper")) / 2;
  const upperUp = (at("MouthUpperUpLeft") + at("MouthUpperUpRight")) / 2;
  const lowerDown = (at("MouthLowerDownLeft") + at("MouthLowerDownRight")) / 2;
  const side = (at("MouthRight") - at("MouthLeft")) * 18 + (at("JawRight") - at("JawLeft")) * 10;
  const cx = dx * 1.15 + side, cy = 105 + dy + jaw * 10;
  const half = 44 * (1 + 0.35 * smile + 0.3 * stretch - 0.45 * pucker - 0.3 * funnel);
  const corner = -smile * 22 + frown * 14;
  // lips part when the jaw opens, unless MouthClose holds them together; funnel rounds them
  const gap = Math.max(0, jaw - close) * 48 + funnel * 12 + lowerDown * 8 + upperUp * 6;
  const thick = 8 * (1 - 0.65 * press) * (1 - 0.6 * roll) + pucker * 5;
  const up = cy - gap * 0.3 - upperUp * 6, low = cy + gap * 0.7;
  const round = 1 + funnel * 0.8 + pucker * 0.5;
  const xl = cx - half, xr = cx + half;
  g.fillStyle = MOUTH;
  g.beginPath();
  g.moveTo(xl, cy + corner);
  g.bezierCurveTo(xl + half * 0.4 / round, up - 4, xr - half * 0.4 / round, up - 4, xr, cy + corner);
  g.bezierCurveTo(xr - half * 0.3 / round, low + 6, xl + half * 0.3 / round, low + 6, xl, cy + corner);
  g.fill();
  if (at("TongueOut") > 0.05) {
    g.fillStyle = "#d9707a";
    g.beginPath(); g.ellipse(cx, low + at("TongueOut") * 14, 16, 6 + at("TongueOut") * 12, 0, 0, 2 * Math.PI); g.fill();
  }
  g.strokeStyle = LIP; g.lineCap = "round"; g.lineWidth = thick;
  g.beginPath(); // upper lip
  g.moveTo(xl, cy + corner);
  g.bezierCurveTo(xl + half * 0.4 / round, up - 4 - thick / 2, xr - half * 0.4 / round, up - 4 - thick / 2, xr, cy + corner);
  g.stroke();
  g.beginPath(); // lower lip
  g.moveTo(xl, cy + corner);
  g.bezierCurveTo(xl + half * 0.3 / round, low + 6 + thick / 2, xr - half * 0.3 / round, low + 6 + thick / 2, xr, cy + corner);
  g.stroke();
}
