#!/usr/bin/env python3
# Independent numpy forward of position 0 (window of one row: no compressor, no indexer) from a converted
# f32 GGUF with ds4 names, compared with the HF reference logits of a fixture. Checks the converter (names,
# layouts, metadata) end to end without the engine. Usage (Debian python3 + numpy):
#   dsv4 convert --in tests/fixtures/flash_w8 --out /tmp/f.gguf --mix f32
#   python3 tools/reference/gguf_row0_check.py /tmp/f.gguf flash_w8
# Measured: 6.5e-7 (flash_w8), 6.7e-7 (mixed_w16), 3.5e-7 (pro_w8) relative max |diff|.
import json,struct,sys,numpy as np
path,fx=sys.argv[1],sys.argv[2]
b=open(path,'rb').read(); o=4
ver,nt,nkv=struct.unpack_from('<IQQ',b,o); o+=20
def rs():
    global o; n=struct.unpack_from('<Q',b,o)[0]; o+=8; s=b[o:o+n].decode(); o+=n; return s
sz={0:1,1:1,2:2,3:2,4:4,5:4,6:4,7:1,10:8,11:8,12:8}
fmt={0:'B',1:'b',2:'H',3:'h',4:'I',5:'i',6:'f',7:'?',10:'Q',11:'q',12:'d'}
def rv(t):
    global o
    if t==8: return rs()
    if t==9:
        et,n=struct.unpack_from('<IQ',b,o); o+=12; return [rv(et) for _ in range(n)]
    v=struct.unpack_from('<'+fmt[t],b,o)[0]; o+=sz[t]; return v
meta={}
for _ in range(nkv):
    k=rs(); t=struct.unpack_from('<I',b,o)[0]; o+=4; meta[k]=rv(t)
info=[]
for _ in range(nt):
    name=rs(); nd=struct.unpack_from('<I',b,o)[0]; o+=4; ne=struct.unpack_from('<'+'Q'*nd,b,o); o+=8*nd
    t,off=struct.unpack_from('<IQ',b,o); o+=12; info.append((name,ne,t,off))
al=meta.get('general.alignment',32); ds=(o+al-1)//al*al
T={}
for name,ne,t,off in info:
    cnt=int(np.prod(ne)); dt={0:'<f4',26:'<i4'}[t]
    T[name]=np.frombuffer(b,dtype=dt,count=cnt,offset=ds+off).reshape(tuple(reversed(ne))).astype(np.float64 if t==0 else np.int64)
P='deepseek4.'
D=meta[P+'embedding_length']; n=meta[P+'hyper_connection.count']; H=meta[P+'attention.head_count']; dh=meta[P+'attention.key_length']
G=meta[P+'attention.output_group_count']; heps=meta[P+'hyper_connection.epsilon']; it=meta[P+'hyper_connection.sinkhorn_iterations']
nh=meta[P+'hash_layer_count']; k=meta[P+'expert_used_count']; scale=meta[P+'expert_weights_scale']; eps=1e-6
import os; d=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'tests', 'fixtures', fx); m=json.load(open(d+'/meta.json')); seq=m['sequences'][0]; tok=seq['tokens'][0]
ref=np.fromfile(d+'/'+seq['logits'],dtype='<f4').reshape(len(seq['tokens']),-1)[0]
def rms(x,w=None):
    y=x/np.sqrt((x*x).mean()+eps); return y if w is None else y*w
def hc(X,p):
    mix=T[p+'_fn.weight']@rms(X.reshape(-1)); base=T[p+'_base.weight']; sc=T[p+'_scale.weight']
    pre=1/(1+np.exp(-(mix[:n]*sc[0]+base[:n])))+heps; post=2/(1+np.exp(-(mix[n:2*n]*sc[1]+base[n:2*n])))
    C=(mix[2*n:]*sc[2]+base[2*n:]).reshape(n,n); C=np.exp(C-C.max(1,keepdims=True)); C=C/C.sum(1,keepdims=True)+heps
    C=C/(C.sum(0,keepdims=True)+heps)
    for _ in range(it-1): C=C/(C.sum(1,keepdims=True)+heps); C=C/(C.sum(0,keepdims=True)+heps)
    return pre,post,C
def swiglu(x,w1,w3,w2):
    g=np.minimum(w1@x,10); u=np.clip(w3@x,-10,10); return w2@(g/(1+np.exp(-g))*u)
X=np.stack([T['token_embd.weight'][tok]]*n)
for L in range(meta[P+'block_count']):
    p=f'blk.{L}.'
    pre,post,C=hc(X,p+'hc_attn'); x=rms((pre[:,None]*X).sum(0),T[p+'attn_norm.weight'])
    qr=rms(T[p+'attn_q_a.weight']@x,T[p+'attn_q_a_norm.weight']); q=(T[p+'attn_q_b.weight']@qr).reshape(H,dh)
    q=q/np.sqrt((q*q).mean(1,keepdims=True)+eps); kv=rms(T[p+'attn_kv.weight']@x,T[p+'attn_kv_a_norm.weight'])
    w=1/(1+np.exp(-(q@kv/np.sqrt(dh)-T[p+'attn_sinks.weight']))); og=(w[:,None]*kv[None,:]).reshape(G,-1)
    wo=T[p+'attn_output_a.weight'].reshape(G,-1,og.shape[1]); low=np.concatenate([wo[g]@og[g] for g in range(G)])
    X=post[:,None]*(T[p+'attn_output_b.weight']@low)[None,:]+C.T@X
    pre,post,C=hc(X,p+'hc_ffn'); x=rms((pre[:,None]*X).sum(0),T[p+'ffn_norm.weight'])
    sc=np.sqrt(np.log1p(np.exp(T[p+'ffn_gate_inp.weight']@x)))
    idx=T[p+'ffn_gate_tid2eid.weight'][tok] if L<nh else np.argsort(-(sc+T[p+'exp_probs_b.bias']))[:k]
    wt=sc[idx]/sc[idx].sum()*scale
    y=sum(wt[j]*swiglu(x,T[p+'ffn_gate_exps.weight'][e],T[p+'ffn_up_exps.weight'][e],T[p+'ffn_down_exps.weight'][e]) for j,e in enumerate(idx))
    y=y+swiglu(x,T[p+'ffn_gate_shexp.weight'],T[p+'ffn_up_shexp.weight'],T[p+'ffn_down_shexp.weight'])
    X=post[:,None]*y[None,:]+C.T@X
mix=T['output_hc_fn.weight']@rms(X.reshape(-1)); w=1/(1+np.exp(-(mix*T['output_hc_scale.weight'][0]+T['output_hc_base.weight'])))+heps
lg=T['output.weight']@rms((w[:,None]*X).sum(0),T['output_norm.weight'])
print(fx,'row0 numpy-on-GGUF vs HF rel',np.abs(lg-ref).max()/np.abs(ref).max())
