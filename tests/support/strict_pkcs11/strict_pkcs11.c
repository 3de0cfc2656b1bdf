/*
 * strict_pkcs11: a PKCS#11 v2.40 module for tests that forwards every call to another module
 * (SoftHSM2 by default) but behaves like the strictest production HSMs.
 *
 *   - AES-GCM encryption: the module chooses every IV itself (like AWS CloudHSM and Thales Luna
 *     in FIPS mode) and writes it into the caller's CK_GCM_PARAMS.pIv buffer; the caller's IV is
 *     ignored ("generate") or, if it is not all zero bytes, refused with
 *     CKR_MECHANISM_PARAM_INVALID ("refuse"). "keep" forwards the caller's IV (SoftHSM's own
 *     behaviour). "ignore" is a broken module for negative tests: it uses an IV of its own and
 *     does not report it (wrapped keys made with it can never be decrypted). Decryption always
 *     uses the caller's IV, as on every HSM.
 *   - C_CopyObject answers CKR_FUNCTION_NOT_SUPPORTED (AWS CloudHSM), unless allowed.
 *   - Optional simulated latency on every call (a network HSM).
 *   - Simulated outages switched at run time through a control file: every call (but
 *     C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList) answers a chosen CKR_* code.
 *   - C_Initialize's arguments (CKF_OS_LOCKING_OK, mutex callbacks) are passed through unchanged.
 *
 * Configuration, read at C_Initialize (environment):
 *   STRICT_PKCS11_TARGET      module to forward to (default /usr/lib/softhsm/libsofthsm2.so).
 *                             Use a copy of the file when the process also loads that module
 *                             directly: the dynamic loader gives one path one instance, and
 *                             two users of one instance would share C_Initialize and logins.
 *   STRICT_PKCS11_IV          generate (default) | refuse | keep | ignore
 *   STRICT_PKCS11_COPY        refuse (default) | allow
 *   STRICT_PKCS11_LATENCY_US  microseconds slept before forwarding each call (default 0)
 *   STRICT_PKCS11_CONTROL     path of the control file (optional)
 *   STRICT_PKCS11_TRACE       path of a file that gets one line per C_Initialize and per
 *                             refused call (optional; for tests)
 *
 * Control file, re-read whenever it changes (checked on every call; write it by rename, or
 * delete it to end an outage). Lines of key=value, '#' starts a comment:
 *   fail=<CKR name or number>   e.g. fail=CKR_TOKEN_NOT_PRESENT, fail=0xE0; fail=0 clears
 *   fail_functions=C_Encrypt,C_Decrypt   limit the failure to these functions (default: all)
 *   latency_us=<n>              overrides STRICT_PKCS11_LATENCY_US while the file exists
 *
 * Self-contained on purpose (no pkcs11.h from a -dev package): the types below are those of
 * PKCS#11 v2.40 for LP64 Unix, where CK_ULONG is unsigned long and structures are not packed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_FLAGS;
typedef CK_ULONG CK_SLOT_ID;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_OBJECT_HANDLE;
typedef CK_ULONG CK_MECHANISM_TYPE;
typedef CK_ULONG CK_USER_TYPE;
typedef unsigned char CK_BYTE;
typedef unsigned char CK_BBOOL;
typedef void *P; /* every other pointer parameter: forwarded untouched */

typedef struct { CK_BYTE major, minor; } CK_VERSION;
typedef struct {
    CK_VERSION cryptokiVersion;
    CK_BYTE manufacturerID[32];
    CK_FLAGS flags;
    CK_BYTE libraryDescription[32];
    CK_VERSION libraryVersion;
} CK_INFO;
typedef struct {
    CK_MECHANISM_TYPE mechanism;
    void *pParameter;
    CK_ULONG ulParameterLen;
} CK_MECHANISM;
typedef struct {
    CK_BYTE *pIv;
    CK_ULONG ulIvLen;
    CK_ULONG ulIvBits;
    CK_BYTE *pAAD;
    CK_ULONG ulAADLen;
    CK_ULONG ulTagBits;
} CK_GCM_PARAMS;
typedef struct {
    void *CreateMutex, *DestroyMutex, *LockMutex, *UnlockMutex;
    CK_FLAGS flags;
    void *pReserved;
} CK_C_INITIALIZE_ARGS;

#define CKR_OK 0x0UL
#define CKR_ARGUMENTS_BAD 0x7UL
#define CKR_FUNCTION_NOT_SUPPORTED 0x54UL
#define CKR_MECHANISM_PARAM_INVALID 0x71UL
#define CKR_CRYPTOKI_NOT_INITIALIZED 0x190UL
#define CKM_AES_GCM 0x1087UL
#define GCM_IV_SIZE 12

/*
 * Every function of CK_FUNCTION_LIST in its order. G: forwarded by a generated wrapper
 * (latency, failure injection, then the target). S: written by hand below.
 * X(name, parameter list, argument list)
 */
#define FUNCTIONS(G, S) \
    S(C_Initialize, (P a), (a)) \
    S(C_Finalize, (P a), (a)) \
    S(C_GetInfo, (CK_INFO *a), (a)) \
    S(C_GetFunctionList, (P a), (a)) \
    G(C_GetSlotList, (CK_BBOOL a, P b, P c), (a, b, c)) \
    G(C_GetSlotInfo, (CK_SLOT_ID a, P b), (a, b)) \
    G(C_GetTokenInfo, (CK_SLOT_ID a, P b), (a, b)) \
    G(C_GetMechanismList, (CK_SLOT_ID a, P b, P c), (a, b, c)) \
    G(C_GetMechanismInfo, (CK_SLOT_ID a, CK_MECHANISM_TYPE b, P c), (a, b, c)) \
    G(C_InitToken, (CK_SLOT_ID a, P b, CK_ULONG c, P d), (a, b, c, d)) \
    G(C_InitPIN, (CK_SESSION_HANDLE a, P b, CK_ULONG c), (a, b, c)) \
    G(C_SetPIN, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, CK_ULONG e), (a, b, c, d, e)) \
    G(C_OpenSession, (CK_SLOT_ID a, CK_FLAGS b, P c, P d, P e), (a, b, c, d, e)) \
    G(C_CloseSession, (CK_SESSION_HANDLE a), (a)) \
    G(C_CloseAllSessions, (CK_SLOT_ID a), (a)) \
    G(C_GetSessionInfo, (CK_SESSION_HANDLE a, P b), (a, b)) \
    G(C_GetOperationState, (CK_SESSION_HANDLE a, P b, P c), (a, b, c)) \
    G(C_SetOperationState, (CK_SESSION_HANDLE a, P b, CK_ULONG c, CK_OBJECT_HANDLE d, \
                            CK_OBJECT_HANDLE e), (a, b, c, d, e)) \
    G(C_Login, (CK_SESSION_HANDLE a, CK_USER_TYPE b, P c, CK_ULONG d), (a, b, c, d)) \
    G(C_Logout, (CK_SESSION_HANDLE a), (a)) \
    G(C_CreateObject, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d), (a, b, c, d)) \
    S(C_CopyObject, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, P c, CK_ULONG d, P e), \
      (a, b, c, d, e)) \
    G(C_DestroyObject, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), (a, b)) \
    G(C_GetObjectSize, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, P c), (a, b, c)) \
    G(C_GetAttributeValue, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, P c, CK_ULONG d), \
      (a, b, c, d)) \
    G(C_SetAttributeValue, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, P c, CK_ULONG d), \
      (a, b, c, d)) \
    G(C_FindObjectsInit, (CK_SESSION_HANDLE a, P b, CK_ULONG c), (a, b, c)) \
    G(C_FindObjects, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d), (a, b, c, d)) \
    G(C_FindObjectsFinal, (CK_SESSION_HANDLE a), (a)) \
    S(C_EncryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM *b, CK_OBJECT_HANDLE c), (a, b, c)) \
    G(C_Encrypt, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), (a, b, c, d, e)) \
    G(C_EncryptUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), (a, b, c, d, e)) \
    G(C_EncryptFinal, (CK_SESSION_HANDLE a, P b, P c), (a, b, c)) \
    G(C_DecryptInit, (CK_SESSION_HANDLE a, P b, CK_OBJECT_HANDLE c), (a, b, c)) \
    G(C_Decrypt, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), (a, b, c, d, e)) \
    G(C_DecryptUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), (a, b, c, d, e)) \
    G(C_DecryptFinal, (CK_SESSION_HANDLE a, P b, P c), (a, b, c)) \
    G(C_DigestInit, (CK_SESSION_HANDLE a, P b), (a, b)) \
    G(C_Digest, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), (a, b, c, d, e)) \
    G(C_DigestUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c), (a, b, c)) \
    G(C_DigestKey, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), (a, b)) \
    G(C_DigestFinal, (CK_SESSION_HANDLE a, P b, P c), (a, b, c)) \
    G(C_SignInit, (CK_SESSION_HANDLE a, P b, CK_OBJECT_HANDLE c), (a, b, c)) \
    G(C_Sign, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), (a, b, c, d, e)) \
    G(C_SignUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c), (a, b, c)) \
    G(C_SignFinal, (CK_SESSION_HANDLE a, P b, P c), (a, b, c)) \
    G(C_SignRecoverInit, (CK_SESSION_HANDLE a, P b, CK_OBJECT_HANDLE c), (a, b, c)) \
    G(C_SignRecover, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), (a, b, c, d, e)) \
    G(C_VerifyInit, (CK_SESSION_HANDLE a, P b, CK_OBJECT_HANDLE c), (a, b, c)) \
    G(C_Verify, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, CK_ULONG e), (a, b, c, d, e)) \
    G(C_VerifyUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c), (a, b, c)) \
    G(C_VerifyFinal, (CK_SESSION_HANDLE a, P b, CK_ULONG c), (a, b, c)) \
    G(C_VerifyRecoverInit, (CK_SESSION_HANDLE a, P b, CK_OBJECT_HANDLE c), (a, b, c)) \
    G(C_VerifyRecover, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), (a, b, c, d, e)) \
    G(C_DigestEncryptUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), \
      (a, b, c, d, e)) \
    G(C_DecryptDigestUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), \
      (a, b, c, d, e)) \
    G(C_SignEncryptUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), \
      (a, b, c, d, e)) \
    G(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE a, P b, CK_ULONG c, P d, P e), \
      (a, b, c, d, e)) \
    G(C_GenerateKey, (CK_SESSION_HANDLE a, P b, P c, CK_ULONG d, P e), (a, b, c, d, e)) \
    G(C_GenerateKeyPair, (CK_SESSION_HANDLE a, P b, P c, CK_ULONG d, P e, CK_ULONG f, P g, \
                          P h), (a, b, c, d, e, f, g, h)) \
    G(C_WrapKey, (CK_SESSION_HANDLE a, P b, CK_OBJECT_HANDLE c, CK_OBJECT_HANDLE d, P e, \
                  P f), (a, b, c, d, e, f)) \
    G(C_UnwrapKey, (CK_SESSION_HANDLE a, P b, CK_OBJECT_HANDLE c, P d, CK_ULONG e, P f, \
                    CK_ULONG g, P h), (a, b, c, d, e, f, g, h)) \
    G(C_DeriveKey, (CK_SESSION_HANDLE a, P b, CK_OBJECT_HANDLE c, P d, CK_ULONG e, P f), \
      (a, b, c, d, e, f)) \
    G(C_SeedRandom, (CK_SESSION_HANDLE a, P b, CK_ULONG c), (a, b, c)) \
    G(C_GenerateRandom, (CK_SESSION_HANDLE a, P b, CK_ULONG c), (a, b, c)) \
    G(C_GetFunctionStatus, (CK_SESSION_HANDLE a), (a)) \
    G(C_CancelFunction, (CK_SESSION_HANDLE a), (a)) \
    G(C_WaitForSlotEvent, (CK_FLAGS a, P b, P c), (a, b, c))

#define MEMBER(name, params, args) CK_RV (*name) params;
typedef struct {
    CK_VERSION version;
    FUNCTIONS(MEMBER, MEMBER)
} CK_FUNCTION_LIST;

#define IGNORE(name, params, args)
#define NAME(name, params, args) #name,
static const char *const function_names[] = {FUNCTIONS(NAME, NAME)};
#define NFUNCTIONS (sizeof(function_names) / sizeof(function_names[0]))

/* -- configuration and run-time control ------------------------------------------------- */

enum iv_mode { IV_GENERATE, IV_REFUSE, IV_KEEP, IV_IGNORE };

static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static void *target_handle;
static CK_FUNCTION_LIST *target;
static enum iv_mode iv_mode = IV_GENERATE;
static int copy_allowed;
static long env_latency_us;
static char control_path[4096];
static char trace_path[4096];

/* The control file's current content, re-parsed when its identity or timestamps change. */
static struct {
    int present;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime, ctime;
    CK_RV fail;
    long latency_us; /* -1: not set */
    unsigned char fail_only[NFUNCTIONS]; /* all zero: every function fails */
    int fail_only_set;
} control;

static const struct { const char *name; CK_RV rv; } rv_names[] = {
    {"CKR_OK", 0x0},
    {"CKR_HOST_MEMORY", 0x2},
    {"CKR_GENERAL_ERROR", 0x5},
    {"CKR_FUNCTION_FAILED", 0x6},
    {"CKR_DEVICE_ERROR", 0x30},
    {"CKR_DEVICE_MEMORY", 0x31},
    {"CKR_DEVICE_REMOVED", 0x32},
    {"CKR_FUNCTION_NOT_SUPPORTED", 0x54},
    {"CKR_SESSION_CLOSED", 0xB0},
    {"CKR_SESSION_HANDLE_INVALID", 0xB3},
    {"CKR_TOKEN_NOT_PRESENT", 0xE0},
    {"CKR_TOKEN_NOT_RECOGNIZED", 0xE1},
    {"CKR_USER_NOT_LOGGED_IN", 0x101},
};

static void trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#include <stdarg.h>
static void trace(const char *fmt, ...) {
    if (!trace_path[0]) return;
    FILE *f = fopen(trace_path, "a");
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static CK_RV parse_rv(const char *text) {
    for (size_t i = 0; i < sizeof(rv_names) / sizeof(rv_names[0]); i++)
        if (strcmp(text, rv_names[i].name) == 0) return rv_names[i].rv;
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 0);
    if (errno || end == text || *end) return 0x5; /* unreadable: a general error, loudly */
    return value;
}

static char *strip(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = 0;
    return s;
}

static void parse_control(FILE *f) {
    control.fail = CKR_OK;
    control.latency_us = -1;
    control.fail_only_set = 0;
    memset(control.fail_only, 0, sizeof(control.fail_only));
    char line[4096];
    while (fgets(line, sizeof(line), f)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = 0;
        char *key = strip(line), *value = strip(eq + 1);
        if (strcmp(key, "fail") == 0) {
            control.fail = parse_rv(value);
        } else if (strcmp(key, "latency_us") == 0) {
            control.latency_us = strtol(value, NULL, 10);
        } else if (strcmp(key, "fail_functions") == 0) {
            control.fail_only_set = 1;
            for (char *name = strtok(value, ", "); name; name = strtok(NULL, ", "))
                for (size_t i = 0; i < NFUNCTIONS; i++)
                    if (strcmp(name, function_names[i]) == 0) control.fail_only[i] = 1;
        }
    }
}

/* Refresh the control state if the file changed; return the failure for function ``index``
 * and the latency to apply. Caller holds nothing. */
static CK_RV check_control(size_t index, long *latency_us) {
    *latency_us = env_latency_us;
    if (!control_path[0]) return CKR_OK;
    struct stat st;
    int exists = stat(control_path, &st) == 0;
    pthread_mutex_lock(&state_lock);
    if (!exists) {
        control.present = 0;
    } else if (!control.present || st.st_dev != control.dev || st.st_ino != control.ino ||
               st.st_size != control.size || st.st_mtim.tv_sec != control.mtime.tv_sec ||
               st.st_mtim.tv_nsec != control.mtime.tv_nsec ||
               st.st_ctim.tv_sec != control.ctime.tv_sec ||
               st.st_ctim.tv_nsec != control.ctime.tv_nsec) {
        FILE *f = fopen(control_path, "r");
        if (f) {
            parse_control(f);
            fclose(f);
            control.present = 1;
            control.dev = st.st_dev;
            control.ino = st.st_ino;
            control.size = st.st_size;
            control.mtime = st.st_mtim;
            control.ctime = st.st_ctim;
        } else {
            control.present = 0;
        }
    }
    CK_RV rv = CKR_OK;
    if (control.present) {
        if (control.latency_us >= 0) *latency_us = control.latency_us;
        if (!control.fail_only_set || control.fail_only[index]) rv = control.fail;
    }
    pthread_mutex_unlock(&state_lock);
    return rv;
}

static void sleep_us(long us) {
    if (us <= 0) return;
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* Latency, then an injected failure if one is switched on: what every forwarded call does. */
static CK_RV before(size_t index) {
    long latency;
    CK_RV rv = check_control(index, &latency);
    sleep_us(latency);
    if (rv != CKR_OK) trace("%s injected 0x%lx", function_names[index], rv);
    if (rv == CKR_OK && target == NULL) rv = CKR_CRYPTOKI_NOT_INITIALIZED;
    return rv;
}

/* -- generated pass-through wrappers ---------------------------------------------------- */

enum {
#define INDEX(name, params, args) IDX_##name,
    FUNCTIONS(INDEX, INDEX)
};

#define WRAPPER(name, params, args)                   \
    static CK_RV w_##name params {                    \
        CK_RV rv = before(IDX_##name);                \
        return rv != CKR_OK ? rv : target->name args; \
    }
FUNCTIONS(WRAPPER, IGNORE)

/* -- hand-written functions ------------------------------------------------------------- */

static CK_FUNCTION_LIST function_list;

static CK_RV w_C_Initialize(P args) {
    const char *path = getenv("STRICT_PKCS11_TARGET");
    const char *iv = getenv("STRICT_PKCS11_IV");
    const char *copy = getenv("STRICT_PKCS11_COPY");
    const char *latency = getenv("STRICT_PKCS11_LATENCY_US");
    const char *control_env = getenv("STRICT_PKCS11_CONTROL");
    const char *trace_env = getenv("STRICT_PKCS11_TRACE");
    if (!path || !*path) path = "/usr/lib/softhsm/libsofthsm2.so";
    if (!iv || !*iv || strcmp(iv, "generate") == 0) {
        iv_mode = IV_GENERATE;
    } else if (strcmp(iv, "refuse") == 0) {
        iv_mode = IV_REFUSE;
    } else if (strcmp(iv, "keep") == 0) {
        iv_mode = IV_KEEP;
    } else if (strcmp(iv, "ignore") == 0) {
        iv_mode = IV_IGNORE;
    } else {
        return CKR_ARGUMENTS_BAD;
    }
    copy_allowed = copy && strcmp(copy, "allow") == 0;
    env_latency_us = latency ? strtol(latency, NULL, 10) : 0;
    snprintf(control_path, sizeof(control_path), "%s", control_env ? control_env : "");
    snprintf(trace_path, sizeof(trace_path), "%s", trace_env ? trace_env : "");
    pthread_mutex_lock(&state_lock);
    control.present = 0;
    pthread_mutex_unlock(&state_lock);

    if (!target_handle) {
        target_handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!target_handle) return 0x5; /* CKR_GENERAL_ERROR */
        CK_RV (*get)(CK_FUNCTION_LIST **) =
            (CK_RV(*)(CK_FUNCTION_LIST **))dlsym(target_handle, "C_GetFunctionList");
        if (!get || get(&target) != CKR_OK) {
            dlclose(target_handle);
            target_handle = NULL;
            target = NULL;
            return 0x5;
        }
    }
    CK_C_INITIALIZE_ARGS *init = args;
    trace("C_Initialize flags=0x%lx mutex_callbacks=%d iv=%s copy=%s", init ? init->flags : 0UL,
          init && init->CreateMutex ? 1 : 0,
          iv_mode == IV_GENERATE ? "generate"
          : iv_mode == IV_REFUSE ? "refuse"
          : iv_mode == IV_KEEP   ? "keep"
                                 : "ignore",
          copy_allowed ? "allow" : "refuse");
    return target->C_Initialize(args);
}

static CK_RV w_C_Finalize(P reserved) {
    if (!target) return CKR_CRYPTOKI_NOT_INITIALIZED;
    return target->C_Finalize(reserved);
}

static CK_RV w_C_GetInfo(CK_INFO *info) {
    if (!target) return CKR_CRYPTOKI_NOT_INITIALIZED;
    CK_RV rv = target->C_GetInfo(info);
    if (rv == CKR_OK && info) {
        static const char description[] = "strict-pkcs11 test module";
        memset(info->libraryDescription, ' ', sizeof(info->libraryDescription));
        memcpy(info->libraryDescription, description, sizeof(description) - 1);
    }
    return rv;
}

static CK_RV w_C_GetFunctionList(P out) {
    if (!out) return CKR_ARGUMENTS_BAD;
    *(CK_FUNCTION_LIST **)out = &function_list;
    return CKR_OK;
}

static CK_RV w_C_CopyObject(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, P templ,
                            CK_ULONG count, P out) {
    CK_RV rv = before(IDX_C_CopyObject);
    if (rv != CKR_OK) return rv;
    if (!copy_allowed) {
        trace("C_CopyObject refused");
        return CKR_FUNCTION_NOT_SUPPORTED;
    }
    return target->C_CopyObject(session, object, templ, count, out);
}

static CK_RV w_C_EncryptInit(CK_SESSION_HANDLE session, CK_MECHANISM *mechanism,
                             CK_OBJECT_HANDLE key) {
    CK_RV rv = before(IDX_C_EncryptInit);
    if (rv != CKR_OK) return rv;
    if (!mechanism || mechanism->mechanism != CKM_AES_GCM || iv_mode == IV_KEEP)
        return target->C_EncryptInit(session, mechanism, key);
    CK_GCM_PARAMS *caller = mechanism->pParameter;
    if (!caller || mechanism->ulParameterLen != sizeof(CK_GCM_PARAMS) || !caller->pIv ||
        caller->ulIvLen != GCM_IV_SIZE)
        return CKR_MECHANISM_PARAM_INVALID;
    if (iv_mode == IV_REFUSE) {
        for (int i = 0; i < GCM_IV_SIZE; i++) {
            if (caller->pIv[i]) {
                trace("C_EncryptInit refused a caller IV");
                return CKR_MECHANISM_PARAM_INVALID;
            }
        }
    }
    CK_BYTE iv[GCM_IV_SIZE];
    if (getrandom(iv, sizeof(iv), 0) != (ssize_t)sizeof(iv)) return 0x5;
    CK_GCM_PARAMS params = *caller;
    params.pIv = iv;
    params.ulIvBits = GCM_IV_SIZE * 8;
    CK_MECHANISM forwarded = {CKM_AES_GCM, &params, sizeof(params)};
    rv = target->C_EncryptInit(session, &forwarded, key);
    if (rv == CKR_OK && iv_mode != IV_IGNORE)
        memcpy(caller->pIv, iv, GCM_IV_SIZE); /* what the caller must store */
    return rv;
}

#define ENTRY(name, params, args) w_##name,
static CK_FUNCTION_LIST function_list = {{2, 40}, FUNCTIONS(ENTRY, ENTRY)};

__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST **out) {
    return w_C_GetFunctionList(out);
}
