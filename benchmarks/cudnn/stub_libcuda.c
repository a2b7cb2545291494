/* A stand-in CUDA driver library (libcuda.so.1) for planning cuDNN graphs without a GPU
 * (benchmarks/cudnn_report.py). cuDNN's runtime-compiled engines load the driver library even when a plan is built
 * for a device profile: this one answers the calls a deviceless plan build makes (initialization, versions, the
 * context push / pop / limit calls, the device attributes of the profile, and cuLink*, which return the NVRTC output
 * they were given) and fails everything that would touch a GPU — a kernel launch, a module load, memory — loudly,
 * naming the call on stderr. Nothing built with it can run. RESNET_FUSED_STUB_CUDA_TRACE=1 names every call. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
enum { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_NOT_FOUND = 500, CUDA_ERROR_NOT_SUPPORTED = 801 };

static int trace(void) {
  static int on = -1;
  if (on < 0) on = getenv("RESNET_FUSED_STUB_CUDA_TRACE") != NULL;
  return on;
}
#define TRACE(name) \
  if (trace()) fprintf(stderr, "stub libcuda: %s\n", name)

static CUresult refuse(const char* name) {
  fprintf(stderr, "stub libcuda: %s is not available without a GPU (deviceless planning only)\n", name);
  return CUDA_ERROR_NOT_SUPPORTED;
}

static char context_token, link_token;

CUresult cuInit(unsigned flags) { (void)flags; TRACE("cuInit"); return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) { TRACE("cuDriverGetVersion"); if (!v) return CUDA_ERROR_INVALID_VALUE; *v = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int* n) { TRACE("cuDeviceGetCount"); *n = 1; return CUDA_SUCCESS; }
CUresult cuDeviceGet(int* d, int ordinal) { TRACE("cuDeviceGet"); if (ordinal != 0) return CUDA_ERROR_INVALID_VALUE; *d = 0; return CUDA_SUCCESS; }

/* The H100 profile's attributes (CUdevice_attribute numbers); 0 for the others. */
CUresult cuDeviceGetAttribute(int* v, int attr, int dev) {
  (void)dev;
  TRACE("cuDeviceGetAttribute");
  switch (attr) {
    case 1: *v = 1024; break;       /* max threads per block */
    case 8: *v = 49152; break;      /* max shared memory per block */
    case 10: *v = 32; break;        /* warp size */
    case 12: *v = 65536; break;     /* registers per block */
    case 16: *v = 132; break;       /* multiprocessor count */
    case 38: *v = 52428800; break;  /* L2 cache size */
    case 39: *v = 2048; break;      /* max threads per multiprocessor */
    case 75: *v = 9; break;         /* compute capability major */
    case 76: *v = 0; break;         /* compute capability minor */
    case 81: *v = 233472; break;    /* max shared memory per multiprocessor */
    case 82: *v = 65536; break;     /* registers per multiprocessor */
    case 97: *v = 232448; break;    /* max shared memory per block, opt-in */
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(void** ctx) { TRACE("cuCtxGetCurrent"); *ctx = &context_token; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void* ctx) { (void)ctx; TRACE("cuCtxSetCurrent"); return CUDA_SUCCESS; }
CUresult cuCtxPushCurrent(void* ctx) { (void)ctx; TRACE("cuCtxPushCurrent"); return CUDA_SUCCESS; }
CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxPushCurrent(ctx); }
CUresult cuCtxPopCurrent(void** ctx) { TRACE("cuCtxPopCurrent"); if (ctx) *ctx = &context_token; return CUDA_SUCCESS; }
CUresult cuCtxPopCurrent_v2(void** ctx) { return cuCtxPopCurrent(ctx); }
CUresult cuCtxGetDevice(int* d) { TRACE("cuCtxGetDevice"); *d = 0; return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t* v, int limit) { (void)limit; TRACE("cuCtxGetLimit"); *v = 0; return CUDA_SUCCESS; }
CUresult cuCtxSetLimit(int limit, size_t v) { (void)limit; (void)v; TRACE("cuCtxSetLimit"); return CUDA_SUCCESS; }
CUresult cuCtxSynchronize(void) { TRACE("cuCtxSynchronize"); return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) { (void)dev; TRACE("cuDevicePrimaryCtxRetain"); *ctx = &context_token; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease(int dev) { (void)dev; TRACE("cuDevicePrimaryCtxRelease"); return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease_v2(int dev) { return cuDevicePrimaryCtxRelease(dev); }

/* cuLink*: keeps the last image added and hands it back as the "linked" cubin. */
static void* link_image;
static size_t link_size;
CUresult cuLinkCreate(unsigned n, void* opts, void** vals, void** state) {
  (void)n; (void)opts; (void)vals;
  TRACE("cuLinkCreate");
  *state = &link_token;
  return CUDA_SUCCESS;
}
CUresult cuLinkCreate_v2(unsigned n, void* opts, void** vals, void** state) { return cuLinkCreate(n, opts, vals, state); }
CUresult cuLinkAddData(void* state, int type, void* data, size_t size, const char* name, unsigned n, void* opts,
                       void** vals) {
  (void)state; (void)type; (void)name; (void)n; (void)opts; (void)vals;
  TRACE("cuLinkAddData");
  free(link_image);
  link_image = malloc(size ? size : 1);
  if (size) memcpy(link_image, data, size);
  link_size = size;
  return CUDA_SUCCESS;
}
CUresult cuLinkAddData_v2(void* state, int type, void* data, size_t size, const char* name, unsigned n, void* opts,
                          void** vals) {
  return cuLinkAddData(state, type, data, size, name, n, opts, vals);
}
CUresult cuLinkAddFile(void* state, int type, const char* path, unsigned n, void* opts, void** vals) {
  (void)state; (void)type; (void)path; (void)n; (void)opts; (void)vals;
  TRACE("cuLinkAddFile");
  return CUDA_SUCCESS;
}
CUresult cuLinkAddFile_v2(void* state, int type, const char* path, unsigned n, void* opts, void** vals) {
  return cuLinkAddFile(state, type, path, n, opts, vals);
}
CUresult cuLinkComplete(void* state, void** cubin, size_t* size) {
  (void)state;
  TRACE("cuLinkComplete");
  static char empty;
  *cubin = link_image ? link_image : &empty;
  *size = link_size;
  return CUDA_SUCCESS;
}
CUresult cuLinkDestroy(void* state) { (void)state; TRACE("cuLinkDestroy"); return CUDA_SUCCESS; }

CUresult cuGetErrorString(CUresult e, const char** s) {
  *s = e == CUDA_SUCCESS ? "no error" : "stub libcuda: not available without a GPU";
  return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
  *s = e == CUDA_SUCCESS ? "CUDA_SUCCESS" : "CUDA_ERROR_NOT_SUPPORTED";
  return CUDA_SUCCESS;
}

/* Loading the linked image: cuDNN finalizes a plan by loading its kernel and reading its attributes. The image is
 * not loaded anywhere (there is no GPU); the handles are tokens and the attributes the profile's limits, so a plan
 * that needs more than the device allows is still refused by cuDNN's own checks against the profile. */
static char library_token, kernel_token;
CUresult cuLibraryLoadData(void** lib, const void* image, void* jit_opts, void** jit_vals, unsigned n_jit,
                           void* lib_opts, void** lib_vals, unsigned n_lib) {
  (void)image; (void)jit_opts; (void)jit_vals; (void)n_jit; (void)lib_opts; (void)lib_vals; (void)n_lib;
  TRACE("cuLibraryLoadData");
  *lib = &library_token;
  return CUDA_SUCCESS;
}
CUresult cuLibraryLoadFromFile(void) { return refuse("cuLibraryLoadFromFile"); }
CUresult cuLibraryUnload(void* lib) { (void)lib; TRACE("cuLibraryUnload"); return CUDA_SUCCESS; }
CUresult cuLibraryGetKernel(void** kernel, void* lib, const char* name) {
  (void)lib; (void)name;
  TRACE("cuLibraryGetKernel");
  *kernel = &kernel_token;
  return CUDA_SUCCESS;
}
CUresult cuKernelGetAttribute(int* v, int attr, void* kernel, int dev) {
  (void)kernel; (void)dev;
  TRACE("cuKernelGetAttribute");
  switch (attr) {
    case 0: *v = 1024; break;   /* max threads per block */
    case 5: case 6: *v = 90; break;  /* PTX / binary version */
    case 8: *v = 232448; break; /* max dynamic shared memory */
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}
CUresult cuKernelSetAttribute(int attr, int v, void* kernel, int dev) {
  (void)attr; (void)v; (void)kernel; (void)dev;
  TRACE("cuKernelSetAttribute");
  return CUDA_SUCCESS;
}
CUresult cuOccupancyMaxPotentialClusterSize(int* size, void* func, const void* config) {
  (void)func; (void)config;
  TRACE("cuOccupancyMaxPotentialClusterSize");
  *size = 1;
  return CUDA_SUCCESS;
}

/* The driver's private tables: none. Callers read the table's size before the error, so they get an empty one. */
CUresult cuGetExportTable(const void** table, const void* id) {
  (void)id;
  static const unsigned long long empty[8];
  TRACE("cuGetExportTable");
  *table = empty;
  return CUDA_ERROR_NOT_FOUND;
}

/* What would touch a GPU: refused loudly. */
#define REFUSE(name) \
  CUresult name(void) { return refuse(#name); }
REFUSE(cuLaunchKernel)
REFUSE(cuLaunchKernelEx)
REFUSE(cuLaunchCooperativeKernel)
REFUSE(cuModuleLoadData)
REFUSE(cuStreamGetCtx)
REFUSE(cuMemAlloc)
REFUSE(cuMemAlloc_v2)

/* Entry points by name, as cudart and cuDNN look them up: this library's own symbols, else "not found". */
CUresult cuGetProcAddress(const char* symbol, void** pfn, int version, unsigned long long flags) {
  (void)version; (void)flags;
  *pfn = dlsym(RTLD_DEFAULT, symbol);
  if (trace()) fprintf(stderr, "stub libcuda: cuGetProcAddress(%s) -> %s\n", symbol, *pfn ? "stub" : "not found");
  return *pfn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}
CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version, unsigned long long flags, int* status) {
  CUresult r = cuGetProcAddress(symbol, pfn, version, flags);
  if (status) *status = r == CUDA_SUCCESS ? 0 : 1; /* CU_GET_PROC_ADDRESS_SUCCESS / SYMBOL_NOT_FOUND */
  return r;
}
