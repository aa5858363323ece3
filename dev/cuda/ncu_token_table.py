#!/usr/bin/env python3
"""Per-kernel table of one decode token from an Nsight Compute CSV (scripts/gpu-flash-bench.sh BENCH_PLAN=ncu:
ncu --csv --print-units base --metrics gpu__time_duration.sum,dram__bytes_read.sum,...).

The token is the run of kernels between the last two output-head GEMVs (the only kernels reading > 400 MB); rows
are grouped by kernel name and launch shape: calls, total ms, us per call, DRAM read GB/s.
usage: ncu_token_table.py ncu.csv
"""
import csv,sys,re,collections
def load(fn):
    k={}
    order=[]
    with open(fn) as f:
        lines=[l for l in f if l.startswith('"')]
    for r in csv.reader(lines):
        if r[0]=="ID" or len(r)<15: continue
        i=int(r[0])
        if i not in k:
            k[i]={'name':r[4],'stream':r[6],'block':r[7],'grid':r[8]}; order.append(i)
        v=r[14].replace(',','')
        try: v=float(v)
        except: pass
        k[i][r[12]]=v
    return [k[i] for i in order]
def short(n):
    n=re.sub(r'\(.*$','',n) if not n.startswith('void') else n
    n=n.replace('void ','')
    n=re.sub(r'dsv4::(cuda::)?(<unnamed>::)?','',n)
    n=re.sub(r'\(.*','',n)
    return n[:70]
if __name__=='__main__':
    ks=load(sys.argv[1])
    heads=[i for i,k in enumerate(ks) if k.get('dram__bytes_read.sum',0)>4e8]
    print('kernels',len(ks),'head idx',heads[-6:])
    a,b=heads[-2]+1,heads[-1]+1
    tok=ks[a:b]
    tot=sum(k['gpu__time_duration.sum'] for k in tok)
    rd=sum(k['dram__bytes_read.sum'] for k in tok)
    print('one decode token: kernels %d, sum of durations %.3f ms, dram read %.3f GB -> %.2f TB/s'%(len(tok),tot/1e6,rd/1e9,rd/tot/1e3))
    agg=collections.OrderedDict()
    for k in tok:
        n=short(k['name'])+' '+k['grid']+'x'+k['block']
        e=agg.setdefault(n,[0,0,0]); e[0]+=1; e[1]+=k['gpu__time_duration.sum']; e[2]+=k['dram__bytes_read.sum']
    print('%-95s %5s %9s %8s %8s'%('kernel grid x block','n','ms','us/call','GB/s'))
    for n,(c,t,r) in sorted(agg.items(),key=lambda x:-x[1][1]):
        print('%-95s %5d %9.3f %8.2f %8.0f'%(n,c,t/1e6,t/c/1e3,r/t))
