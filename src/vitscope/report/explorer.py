"""The report's attention explorer: per-head attention maps of a few images, embedded in report.html.

Choose the image, the block, a head (or the mean over heads) and the query token (click the image);
every model is drawn side by side for the same query. The maps come from ``arrays.npz``
(:class:`vitscope.analyses.AttentionMaps`: uint8 rows scaled to each row's maximum, float16 maxima),
embedded as base64 and drawn by a few lines of plain JavaScript on ``<canvas>``: no network, no library.

Size: the attention bytes embedded are capped at ``max_bytes`` (:data:`EXPLORER_MAX_BYTES`, 8 MiB of
raw bytes; base64 adds a third). Over the cap, fewer images are embedded; if one image of every model
is still over it, the maps are averaged over heads, then every other block is dropped until they fit.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps

__all__ = ["EXPLORER_MAX_BYTES", "ExplorerModel", "explorer_models", "explorer_html"]

EXPLORER_MAX_BYTES = 8 * 2**20


@dataclass
class ExplorerModel:
    """One model's maps as embedded: rows uint8 [I, B, H, N, N] (scaled to each row's maximum), peaks [I, B, H, N]."""

    label: str
    color: str
    grid: tuple[int, int]
    blocks: list[int]
    rows: np.ndarray
    peaks: np.ndarray
    per_head: bool = True

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)

    def first_images(self, count: int) -> ExplorerModel:
        return ExplorerModel(
            self.label, self.color, self.grid, self.blocks, self.rows[:count], self.peaks[:count], self.per_head
        )

    def head_mean(self) -> ExplorerModel:
        """The maps averaged over heads (dequantised, averaged, quantised again)."""
        attn = self.rows.astype(np.float32) / 255.0 * np.nan_to_num(self.peaks.astype(np.float32))[..., None]
        mean = attn.mean(axis=2, keepdims=True)
        peaks = mean.max(axis=-1)
        scaled = mean / np.maximum(peaks, np.finfo(np.float32).tiny)[..., None]
        rows = np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)
        return ExplorerModel(self.label, self.color, self.grid, self.blocks, rows, peaks, per_head=False)

    def every_other_block(self) -> ExplorerModel:
        keep = list(range(len(self.blocks) - 1, -1, -2))[::-1]  # the last block always stays
        return ExplorerModel(
            self.label,
            self.color,
            self.grid,
            [self.blocks[i] for i in keep],
            self.rows[:, keep],
            self.peaks[:, keep],
            self.per_head,
        )


def explorer_models(
    models: list[str], arrays: Mapping[str, np.ndarray], colors: Mapping[str, str], max_bytes: int
) -> list[ExplorerModel]:
    """The models whose maps ``arrays`` holds, cut down to ``max_bytes`` of attention rows in all."""
    found = []
    for model in models:
        rows = arrays.get(f"{model}/attention_rows")
        if rows is None or rows.size == 0:
            continue
        grid = tuple(int(v) for v in arrays[f"{model}/attention_grid"])
        blocks = [int(b) for b in arrays[f"{model}/attention_blocks"]]
        peaks = np.asarray(arrays[f"{model}/attention_peaks"], dtype=np.float32)
        found.append(ExplorerModel(model, colors[model], (grid[0], grid[1]), blocks, np.asarray(rows), peaks))
    if not found:
        return []
    images = min(m.rows.shape[0] for m in found)
    if "example_images" in arrays:
        images = min(images, len(arrays["example_images"]))
    for count in range(images, 0, -1):
        fitted = [m.first_images(count) for m in found]
        if sum(m.nbytes for m in fitted) <= max_bytes:
            return fitted
    fitted = [m.first_images(1).head_mean() for m in found]
    while sum(m.nbytes for m in fitted) > max_bytes and any(len(m.blocks) > 1 for m in fitted):
        fitted = [m.every_other_block() for m in fitted]
    return fitted


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _payload(models: list[ExplorerModel], images: np.ndarray | None) -> dict[str, Any]:
    count = models[0].rows.shape[0]
    lut = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    payload: dict[str, Any] = {
        "lut": _b64(lut),
        "images": None,
        "models": [
            {
                "label": m.label,
                "color": m.color,
                "grid": list(m.grid),
                "blocks": m.blocks,
                "heads": int(m.rows.shape[2]),
                "perHead": m.per_head,
                "count": count,
                "rows": _b64(m.rows),
                "peaks": _b64(np.nan_to_num(m.peaks).astype("<f4")),
            }
            for m in models
        ],
    }
    if images is not None and len(images) >= count:
        pixels = np.asarray(images[:count], dtype=np.uint8)
        payload["images"] = {"count": count, "h": int(pixels.shape[1]), "w": int(pixels.shape[2]), "rgb": _b64(pixels)}
    return payload


def explorer_html(models: list[ExplorerModel], images: np.ndarray | None) -> str:
    """The explorer's controls, canvases and script (one ``<div id="explorer">``); empty when no maps exist."""
    if not models:
        return ""
    payload = json.dumps(_payload(models, images), separators=(",", ":"))
    heads = max(m.rows.shape[2] for m in models)
    count = models[0].rows.shape[0]
    depth = max(max(m.blocks) for m in models)
    image_options = "".join(f'<option value="{i}">image {i + 1}</option>' for i in range(count))
    head_options = '<option value="-1">mean over heads</option>' + "".join(
        f'<option value="{h}">head {h + 1}</option>' for h in range(heads) if models[0].per_head
    )
    toggles = "".join(
        f'<label class="ex-toggle"><input type="checkbox" checked data-model="{html.escape(m.label)}"> '
        f'<span class="swatch" style="background:{m.color}"></span>{html.escape(m.label)}</label>'
        for m in models
    )
    stored = (
        f"{count} image(s), every head" if models[0].per_head else "1 image, mean over heads (size cap)"
    ) + f", blocks {', '.join(map(str, models[0].blocks))}"
    return (
        '<div id="explorer">'
        '<div class="ex-controls">'
        f'<label>image <select id="ex-image">{image_options}</select></label>'
        f'<label>block <input type="range" id="ex-block" min="1" max="{depth}" value="{depth}"> '
        f'<output id="ex-block-out">{depth}</output></label>'
        f'<label>head <select id="ex-head">{head_options}</select></label>'
        '<label><input type="checkbox" id="ex-shared"> one colour scale for all models</label>'
        f'<span class="ex-models">{toggles}</span></div>'
        '<p class="ex-help">Click a patch of any image to make it the query (cyan box). Each map is scaled to its '
        "own maximum (bright = most attention), or with one colour scale to the largest value shown, which "
        f"shows how flat a near-uniform map is. Query spread: how far, on average, one query's map is from the "
        "mean map over all queries (total variation, 0 to 1): near 0 when every query attends the same way "
        f"(CL's collapse, or uniform attention), larger for local maps. Stored: {html.escape(stored)}.</p>"
        '<div id="ex-panels"></div>'
        f'<script type="application/json" id="explorer-data">{payload}</script>'
        f"<script>{SCRIPT}</script></div>"
    )


EXPLORER_CSS = """
.ex-controls{display:flex;flex-wrap:wrap;gap:8px 18px;align-items:center;margin:8px 0}
.ex-controls select,.ex-controls input{vertical-align:middle}
.ex-toggle{margin-right:10px;white-space:nowrap}.ex-help{font-size:.85em;color:#55606b;margin:4px 0 8px}
#ex-panels{display:flex;flex-wrap:wrap;gap:14px}.ex-panel{text-align:center;font-size:.8em;width:202px}
.ex-panel canvas{display:block;cursor:crosshair;border:1px solid #dde1e6;width:200px;height:200px}
.ex-panel b{display:block;margin-bottom:3px}
"""

SCRIPT = r"""
(function(){
const data=JSON.parse(document.getElementById('explorer-data').textContent);
const bytes=s=>Uint8Array.from(atob(s),c=>c.charCodeAt(0));
const lut=bytes(data.lut);
const models=data.models.map(m=>Object.assign({},m,{rows:bytes(m.rows),peaks:new Float32Array(bytes(m.peaks).buffer)}));
const state={image:0,block:+document.getElementById('ex-block').value,head:-1,query:[0.5,0.5]};
const SIZE=200;
let photo=null;
function imageCanvas(i){
  if(!data.images)return null;
  const {h,w}=data.images,rgb=bytes(data.images.rgb),c=document.createElement('canvas');
  c.width=w;c.height=h;const ctx=c.getContext('2d'),img=ctx.createImageData(w,h);
  for(let p=0;p<h*w;p++){for(let k=0;k<3;k++)img.data[4*p+k]=rgb[(i*h*w+p)*3+k];img.data[4*p+3]=255;}
  ctx.putImageData(img,0,0);return c;
}
function attention(m,blockIndex,q){
  const [gh,gw]=m.grid,n=gh*gw,H=m.heads,out=new Float32Array(n);
  const heads=state.head<0||!m.perHead?[...Array(H).keys()]:(state.head<H?[state.head]:[]);
  for(const hd of heads){
    const r=((state.image*m.blocks.length+blockIndex)*H+hd)*n+q,peak=m.peaks[r];
    for(let k=0;k<n;k++)out[k]+=m.rows[r*n+k]/255*peak/heads.length;
  }
  return heads.length?out:null;
}
function querySpread(m,blockIndex){
  // mean total-variation distance between each query's map and the mean map: 0 = one map for every query
  const n=m.grid[0]*m.grid[1],maps=[],mean=new Float32Array(n);
  for(let q=0;q<n;q++){
    const a=attention(m,blockIndex,q);if(!a)return null;
    maps.push(a);for(let k=0;k<n;k++)mean[k]+=a[k]/n;
  }
  let total=0;for(const a of maps){let d=0;for(let k=0;k<n;k++)d+=Math.abs(a[k]-mean[k]);total+=d/2;}
  return total/n;
}
function nearestBlock(m){
  let best=0;
  m.blocks.forEach((b,i)=>{if(Math.abs(b-state.block)<Math.abs(m.blocks[best]-state.block))best=i;});
  return best;
}
function current(m){
  const [gh,gw]=m.grid,qr=Math.min(gh-1,Math.floor(state.query[0]*gh)),qc=Math.min(gw-1,Math.floor(state.query[1]*gw));
  const b=nearestBlock(m),map=attention(m,b,qr*gw+qc);
  let top=0;if(map)for(const v of map)top=Math.max(top,v);
  return {b,qr,qc,map,top,spread:querySpread(m,b)};
}
function draw(m,view,scale){
  const [gh,gw]=m.grid,{b,qr,qc,map,top,spread}=view,ctx=m.canvas.getContext('2d');
  ctx.clearRect(0,0,SIZE,SIZE);ctx.imageSmoothingEnabled=false;
  if(photo)ctx.drawImage(photo,0,0,SIZE,SIZE);
  const cw=SIZE/gw,ch=SIZE/gh;
  ctx.globalAlpha=photo?0.72:1;
  for(let r=0;r<gh;r++)for(let c=0;c<gw;c++){
    const v=map&&scale>0?Math.min(1,map[r*gw+c]/scale):0,i=Math.round(v*255);
    ctx.fillStyle=map?`rgb(${lut[3*i]},${lut[3*i+1]},${lut[3*i+2]})`:'#ccc';
    ctx.fillRect(c*cw,r*ch,Math.ceil(cw),Math.ceil(ch));
  }
  ctx.globalAlpha=1;ctx.strokeStyle='cyan';ctx.lineWidth=2;ctx.strokeRect(qc*cw+1,qr*ch+1,cw-2,ch-2);
  const head=state.head<0||!m.perHead?'mean over heads'
    :(state.head<m.heads?`head ${state.head+1}`:`no head ${state.head+1}`);
  m.caption.textContent=`block ${m.blocks[b]} · ${head} · query (${qr}, ${qc})`+(map?` · max ${top.toFixed(3)}`:'')
    +(spread===null?'':` · query spread ${spread.toFixed(2)}`);
}
function drawAll(){
  photo=imageCanvas(state.image);
  const shown=models.filter(m=>m.panel.style.display!=='none'),views=shown.map(current);
  const shared=document.getElementById('ex-shared').checked?Math.max(0,...views.map(v=>v.top)):0;
  shown.forEach((m,i)=>draw(m,views[i],shared||views[i].top));
}
const panels=document.getElementById('ex-panels');
for(const m of models){
  const panel=document.createElement('div');panel.className='ex-panel';
  const title=document.createElement('b');title.textContent=m.label;title.style.color=m.color;
  const canvas=document.createElement('canvas');canvas.width=SIZE;canvas.height=SIZE;
  canvas.className='ex-map';canvas.dataset.model=m.label;
  const caption=document.createElement('div');caption.className='ex-caption';
  canvas.addEventListener('click',e=>{const box=canvas.getBoundingClientRect();
    state.query=[Math.min(0.999,Math.max(0,(e.clientY-box.top)/box.height)),Math.min(0.999,Math.max(0,(e.clientX-box.left)/box.width))];drawAll();});
  panel.append(title,canvas,caption);panels.append(panel);Object.assign(m,{panel,canvas,caption});
}
document.getElementById('ex-image').addEventListener('change',e=>{state.image=+e.target.value;drawAll();});
document.getElementById('ex-head').addEventListener('change',e=>{state.head=+e.target.value;drawAll();});
document.getElementById('ex-shared').addEventListener('change',drawAll);
const blockInput=document.getElementById('ex-block');
blockInput.addEventListener('input',e=>{state.block=+e.target.value;document.getElementById('ex-block-out').textContent=e.target.value;drawAll();});
document.querySelectorAll('.ex-toggle input').forEach(box=>box.addEventListener('change',()=>{
  const m=models.find(x=>x.label===box.dataset.model);m.panel.style.display=box.checked?'':'none';drawAll();}));
drawAll();
})();
"""
